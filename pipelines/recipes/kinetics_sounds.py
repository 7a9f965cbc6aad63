"""Kinetics-Sounds: the Kinetics-400 classes that can be heard (Arandjelović & Zisserman,
"Look, Listen and Learn", ICCV 2017, appendix A1: 34 classes), 10 s YouTube clips.

Split ``ks``: the clips of those classes in the user's Kinetics-400 ``train.csv`` (train)
and ``validate.csv`` / ``val.csv`` (test), as the balancing papers use them (their test set
is Kinetics' validation set). Columns ``label,youtube_id,time_start,time_end,split`` (the
CVDF / DeepMind annotation files). Clips are the files the user downloaded
(``pipelines/recipes/_youtube.py`` lists the names recognised); missing ones are counted
per part, not errors.

Class list: appendix A1 names 34 classes by the names of a preliminary Kinetics release.
Four are renamed in Kinetics-400 (blowing out -> blowing out candles, dribbling ball ->
dribbling basketball, mowing the lawn by pushing lawnmower -> mowing lawn, stomping ->
stomping grapes) and two have no Kinetics-400 class (fingerpicking, patting): 32 classes.
OGM-GE's own lists (GeWu-Lab/OGM-GE_CVPR2022, data/KineticSound/my_train.txt and
my_test.txt) use 31 classes (integer labels 0-30) without publishing their names, so they
cannot be reproduced by name; ``--classes FILE`` (one Kinetics-400 class per line) sets any
other list. Classes the user's CSVs do not hold are named in the summary.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

from avbalance.errors import UserError
from manifests.io import write_manifest
from pipelines.recipes._youtube import ListedClip, build_manifest, summarise
from pipelines.recipes.base import RECIPES, Recipe

KS_CLASSES = (
    "blowing nose", "blowing out candles", "bowling", "chopping wood", "dribbling basketball", "laughing",
    "mowing lawn", "playing accordion", "playing bagpipes", "playing bass guitar", "playing clarinet",
    "playing drums", "playing guitar", "playing harmonica", "playing keyboard", "playing organ", "playing piano",
    "playing saxophone", "playing trombone", "playing trumpet", "playing violin", "playing xylophone",
    "ripping paper", "shoveling snow", "shuffling cards", "singing", "stomping grapes", "tap dancing",
    "tapping guitar", "tapping pen", "tickling", "typing",
)
CLIP_SECONDS = 10.0
K400_COLUMNS = ("label", "youtube_id", "time_start")


def read_k400_csv(path: str, part: str, classes: set[str]) -> tuple[list[ListedClip], set[str]]:
    """Rows of one Kinetics-400 annotation file whose label is in ``classes``, and every label seen."""
    rows, labels = [], set()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not set(K400_COLUMNS) <= set(reader.fieldnames):
            raise UserError(f"{path} has no header with {', '.join(K400_COLUMNS)}: is it a Kinetics-400 annotation CSV?")
        for n, row in enumerate(reader, 2):
            labels.add(row["label"])
            if row["label"] not in classes:
                continue
            try:
                start = int(float(row["time_start"]))
            except ValueError:
                raise UserError(f"{path} line {n}: time_start {row['time_start']!r} is not a number") from None
            rows.append(ListedClip(row["youtube_id"], start, row["label"], part))
    return rows, labels


def find_csv(folder: str, names: tuple[str, ...]) -> str | None:
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


@RECIPES.register("kinetics-sounds")
class KineticsSounds(Recipe):
    description = "Kinetics-Sounds: downloaded Kinetics-400 clips of 32 audible classes (split ks: K400 train / val as test)"
    root_help = "folder holding the downloaded clips (any depth), e.g. <ytid>_<start:06d>_<end:06d>.mp4"
    default_split = "ks"
    clip_seconds = CLIP_SECONDS
    default_stages = ("frames", "audio", "pack")  # sound and scene; no face stages
    spec_seconds = CLIP_SECONDS  # the whole clip, as OGM-GE's KS spectrograms cover it
    # BalanceBenchmark's KS loader (KS_dataset.py, KSDataset.__getitem__): 3 of the 1-fps
    # frames, one from each third of the clip.
    train_defaults = {"data.frame_sampling": "spread"}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from avbalance.ranges import Allowed, arg

        parser.add_argument("--k400-csv-dir", help="folder with Kinetics-400's train.csv and validate.csv (or val.csv) "
                            "(default: the root)")
        parser.add_argument("--classes", help="a file of class names, one per line (default: the 32 Kinetics-Sounds classes)")
        parser.add_argument("--val-fraction", type=arg(float, Allowed(lo=0, hi=1, hi_open=True)), default=0.0,
                            help="share of the train videos held out as a val part, by YouTube id, 0 <= f < 1 (default 0)")

    def class_list(self) -> list[str]:
        path = self.options.get("classes")
        if not path:
            return sorted(KS_CLASSES)
        if not os.path.isfile(path):
            raise UserError(f"--classes {path}: no such file")
        with open(path, encoding="utf-8") as fh:
            names = sorted({line.strip() for line in fh if line.strip()})
        if len(names) < 2:
            raise UserError(f"--classes {path} names {len(names)} class(es); a classifier needs at least 2")
        return names

    def prepare(self, root: str, out: str) -> dict:
        started = time.time()
        if not os.path.isdir(root):
            raise UserError(f"--root {root} is not a folder")
        folder = self.options.get("k400_csv_dir") or root
        train_csv = find_csv(folder, ("train.csv", "kinetics_400_train.csv"))
        val_csv = find_csv(folder, ("validate.csv", "val.csv", "kinetics_400_val.csv"))
        if train_csv is None or val_csv is None:
            raise UserError(f"Kinetics-400's annotation files train.csv and validate.csv (or val.csv) are not both in {folder}: "
                            "get them with the dataset (e.g. https://github.com/cvdfoundation/kinetics-dataset) and pass "
                            "--k400-csv-dir DIR")
        classes = self.class_list()
        train, seen_train = read_k400_csv(train_csv, "train", set(classes))
        test, seen_val = read_k400_csv(val_csv, "test", set(classes))
        absent = sorted(set(classes) - seen_train - seen_val)
        if len(absent) == len(classes):
            raise UserError(f"no class of the list is in {train_csv} or {val_csv}: are they Kinetics-400 annotation files?")
        clips, skipped, index = build_manifest(root, train + test, classes, self.default_split, CLIP_SECONDS,
                                               self.options.get("val_fraction") or 0.0)
        if not clips:
            raise UserError(f"none of the {len(train) + len(test)} Kinetics-Sounds clips the CSVs list is under {root} "
                            f"({index.files_seen} video files seen); name them <ytid>_<start:06d>_<end:06d>.mp4")
        summary = summarise(self.name, root, classes, clips, skipped, index, self.default_split, started,
                            lists=[os.path.abspath(train_csv), os.path.abspath(val_csv)], listed=len(train) + len(test),
                            classes_not_in_csv=absent)
        write_manifest(out, clips, skipped, summary)
        return summary
