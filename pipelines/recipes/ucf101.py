"""UCF-101 (Soomro et al. 2012) as RGB + optical flow: two visual modalities, no audio.

As distributed: ``UCF-101/<Class>/v_<Class>_g<GG>_c<CC>.avi`` (320 x 240, 25 fps; groups
01-25, each group's clips share an actor and a scene) and the recognition-task lists
``ucfTrainTestlist/classInd.txt`` (``1 ApplyEyeMakeup``), ``trainlist0N.txt``
(``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``) and ``testlist0N.txt``, N = 1..3 (the
official splits hold groups 1-7, 8-14 and 15-21 out for test). Splits ``ucf1``..``ucf3``
follow them; the val part is ``--val-groups`` whole groups drawn (seeded) from each split's
training groups, so no actor or scene is in both train and val. Names are matched
case-insensitively (the lists and files disagree on ``HandStandPushups``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time

from avbalance.errors import UserError
from manifests.io import split_summary, write_manifest
from pipelines.recipes._youtube import missing_counts
from pipelines.recipes.base import RECIPES, Recipe

MISSING = "not in the corpus: the list names it but no such .avi is under the root"
CLIP_NAME = re.compile(r"^v_(?P<cls>[A-Za-z]+)_g(?P<group>\d{2})_c(?P<clip>\d{2})$")
SPLITS = ("ucf1", "ucf2", "ucf3")
LISTS = "ucfTrainTestlist"


def find_lists(root: str, lists: str | None) -> str:
    """The folder holding classInd.txt: ``--lists``, else ROOT/ucfTrainTestlist or ROOT."""
    for folder in ([lists] if lists else [os.path.join(root, LISTS), root]):
        if os.path.isfile(os.path.join(folder, "classInd.txt")):
            return folder
    where = lists or f"{os.path.join(root, LISTS)} or {root}"
    raise UserError(f"UCF-101's split lists (classInd.txt, trainlist01.txt, testlist01.txt, ...) are not in {where}: unzip "
                    "UCF101TrainTestSplits-RecognitionTask.zip there or pass --lists DIR")


def read_class_index(path: str) -> list[str]:
    """Class names in classInd.txt order (index 1 first)."""
    entries = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise UserError(f"{path} line {n} is not `<index> <ClassName>`: {line.strip()!r}")
            entries.append((int(parts[0]), parts[1]))
    return [name for _, name in sorted(entries)]


def read_list(path: str) -> list[str]:
    """The ``Class/v_Class_gGG_cCC.avi`` paths a train or test list names (labels ignored:
    the class folder gives the label)."""
    with open(path, encoding="utf-8") as fh:
        return [line.split()[0].replace("\\", "/") for line in fh if line.strip()]


def index_videos(root: str) -> tuple[dict[str, str], int]:
    """Lower-cased file stem -> path relative to the root, for every .avi below it."""
    found, seen = {}, 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(".avi"):
                seen += 1
                found.setdefault(os.path.splitext(name)[0].lower(), os.path.relpath(os.path.join(folder, name), root))
    return found, seen


def val_groups(train_groups: set[int], k: int, seed: int, split_number: int) -> list[int]:
    """``k`` of the split's training groups, drawn with a generator seeded by (seed, split)."""
    if k >= len(train_groups):
        raise UserError(f"--val-groups {k} leaves no training group (split {split_number} trains on {len(train_groups)})")
    return sorted(random.Random(seed * 1000 + split_number).sample(sorted(train_groups), k))


@RECIPES.register("ucf101")
class UCF101(Recipe):
    description = "UCF-101: UCF-101/<Class>/*.avi + ucfTrainTestlist/, 101 classes, RGB + optical flow; splits ucf1..ucf3"
    root_help = "corpus folder (holds UCF-101/<Class>/*.avi, or the class folders, and ucfTrainTestlist/)"
    default_split = "ucf1"
    clip_seconds = None  # 1.1 to 71 s, mean 7.2 s
    default_stages = ("frames", "flow", "pack")  # no audio: RGB and motion are the two modalities
    # BalanceBenchmark's UCF-101 loader (ucf101_dataset.py, UCF101Dataset.__getitem__): 3 RGB
    # frames and 3 flow fields, one from each third of the clip. "spread" picks the same
    # instants for both: flow slot k starts at RGB frame k.
    train_defaults = {"data.frame_sampling": "spread"}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from avbalance.ranges import Allowed, arg

        parser.add_argument("--lists", help="folder with classInd.txt, trainlist0N.txt, testlist0N.txt "
                            "(default: ROOT/ucfTrainTestlist, else ROOT)")
        parser.add_argument("--val-groups", type=arg(int, Allowed(lo=0, hi=17)), default=3,
                            help="whole groups (of a split's 18 training groups) held out as the val part, 0-17; "
                                 "0: no val part (default 3)")
        parser.add_argument("--val-seed", type=arg(int, Allowed(lo=0)), default=0, help="seed of the val groups' draw (default 0)")

    def prepare(self, root: str, out: str) -> dict:
        started = time.time()
        if not os.path.isdir(root):
            raise UserError(f"--root {root} is not a folder")
        lists = find_lists(root, self.options.get("lists"))
        classes = read_class_index(os.path.join(lists, "classInd.txt"))
        label_of = {c.lower(): i for i, c in enumerate(classes)}
        videos, seen = index_videos(root)
        k, seed = self.options.get("val_groups", 3), self.options.get("val_seed", 0)

        assigned: dict[str, dict[str, str]] = {}  # stem -> {split: part}
        listed_path: dict[str, str] = {}
        problems: dict[str, str] = {}
        val_by_split = {}
        for n, split in enumerate(SPLITS, 1):
            train_path, test_path = (os.path.join(lists, f"{kind}list0{n}.txt") for kind in ("train", "test"))
            if not (os.path.isfile(train_path) and os.path.isfile(test_path)):
                continue  # a copy may hold split 1 only
            entries = [(p, "train") for p in read_list(train_path)] + [(p, "test") for p in read_list(test_path)]
            groups = set()
            for rel, part in entries:
                stem = os.path.splitext(os.path.basename(rel))[0]
                match = CLIP_NAME.match(stem)
                if match is None or rel.split("/")[0].lower() not in label_of:
                    problems[stem] = f"the list names {rel!r}, not Class/v_Class_gGG_cCC.avi of a class in classInd.txt"
                    continue
                if part == "train":
                    groups.add(int(match["group"]))
                listed_path.setdefault(stem, rel)
                assigned.setdefault(stem, {})[split] = part
            held = val_groups(groups, k, seed, n) if k else []
            val_by_split[split] = held
            for stem, parts in assigned.items():
                match = CLIP_NAME.match(stem)
                if parts.get(split) == "train" and int(match["group"]) in held:
                    parts[split] = "val"
        if not val_by_split:
            raise UserError(f"{lists} holds classInd.txt but no trainlist0N.txt / testlist0N.txt pair")

        clips, skipped = self._records(root, classes, label_of, videos, assigned, listed_path)
        skipped += [{"clip_id": stem, "path": stem + ".avi", "reason": reason} for stem, reason in sorted(problems.items())]
        if not clips:
            raise UserError(f"none of the {len(assigned)} clips the lists in {lists} name is under {root} "
                            f"({seen} .avi files seen): expected UCF-101/<Class>/v_<Class>_gGG_cCC.avi")
        splits = [s for s in SPLITS if s in val_by_split]
        summary = {
            "corpus": self.name, "root": os.path.abspath(root), "lists": os.path.abspath(lists),
            "classes": classes, "clips": len(clips), "files_seen": seen,
            "unlisted_files": len(set(videos) - {s.lower() for s in assigned}),
            "skipped_files": len(skipped),
            "missing": {s: missing_counts(skipped, s, MISSING) for s in splits},
            "val_groups": val_by_split,
            "splits": split_summary(clips, splits, classes, group_word="groups"),
            "seconds": round(time.time() - started, 2),
        }
        write_manifest(out, clips, skipped, summary)
        return summary

    @staticmethod
    def _records(root: str, classes: list[str], label_of: dict[str, int], videos: dict[str, str],
                 assigned: dict[str, dict[str, str]], listed_path: dict[str, str]) -> tuple[list[dict], list[dict]]:
        from manifests.probe import probe_file
        from manifests.record import clip_record

        clips, skipped = [], []
        for stem in sorted(assigned):
            splits = assigned[stem]
            rel = videos.get(stem.lower())
            if rel is None:
                skipped.append({"clip_id": stem, "splits": splits, "path": listed_path[stem], "reason": MISSING, "absent": True})
                continue
            probe = probe_file(os.path.join(root, rel))
            if probe.problem:
                skipped.append({"clip_id": stem, "splits": splits, "path": rel, "reason": probe.problem})
                continue
            match = CLIP_NAME.match(stem)
            label = label_of[listed_path[stem].split("/")[0].lower()]
            clips.append(clip_record(stem, {"video": (rel, probe)}, label, classes[label], splits,
                                     group=f"{classes[label]}_g{match['group']}",
                                     meta={"group": int(match["group"]), "clip": int(match["clip"])}))
        return clips, skipped

