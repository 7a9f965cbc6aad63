"""``ave``: the AVE dataset (Tian et al., ECCV 2018) as distributed.

Layout (AVE_Dataset.zip): ``AVE/<YouTube id>.mp4`` (10 s clips, H.264 + AAC), and
``Annotations.txt``, ``trainSet.txt``, ``valSet.txt``, ``testSet.txt``, one event a line:
``Category&VideoID&Quality&StartTime&EndTime`` (integer seconds; ``Annotations.txt`` starts
with that line as a header). 28 categories; 4,143 events; one video may hold two events.

``--clip video`` (default) makes one clip of the whole 10 s video, as OGM-GE's loader does
(``dataset/dataset.py`` keys AVE samples by video id, reads the whole video's frames and
audio, and drops a video listed twice), and the methods built on its code; ``--clip event``
makes one clip per event, its window start-end, as the MLB paper describes ("video
segments with the event"). docs/recipes.md says more.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

from avbalance.errors import UserError
from avbalance.progress import progress_bar
from manifests.io import split_summary, write_manifest
from manifests.probe import probe_file
from manifests.record import clip_record, safe_clip_id
from pipelines.recipes.base import RECIPES, Recipe

LIST_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
SPLIT = "official"


def read_events(path: str) -> list[dict]:
    """The events of one AVE list file (the header line, if any, skipped)."""
    events = []
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, start=1):
            line = line.strip()
            if not line or line.lower().startswith("category&"):
                continue
            fields = line.split("&")
            if len(fields) != 5:
                raise UserError(f"{path} line {n}: expected Category&VideoID&Quality&StartTime&EndTime, got {line!r}")
            category, vid, quality, start, end = fields
            try:
                start_s, end_s = float(start), float(end)
            except ValueError:
                raise UserError(f"{path} line {n}: start and end must be seconds, got {start!r} and {end!r}") from None
            events.append({"category": category, "video_id": vid, "quality": quality, "start": start_s, "end": end_s, "line": n})
    return events


@RECIPES.register("ave")
class Ave(Recipe):
    description = "AVE (ECCV 2018): AVE/*.mp4 + Annotations.txt, trainSet/valSet/testSet.txt; 28 classes, 10 s clips; split official"
    root_help = "the AVE_Dataset folder (holds AVE/ and Annotations.txt, trainSet.txt, valSet.txt, testSet.txt)"
    default_split = SPLIT
    clip_seconds = 10.0
    spec_seconds = 10.0
    # Whole videos: OGM-GE's AVE loader spreads its 3 frames over the clip; event windows:
    # MLB's consecutive 1-fps frames (docs/recipes.md).
    train_defaults = {"data.frame_sampling": "spread"}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if options.get("clip") == "event":
            self.train_defaults = {"data.frame_sampling": "consecutive"}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clip", choices=("video", "event"), default="video",
                            help="one clip per video, the whole 10 s, as OGM-GE does; or one per event, its start-end "
                                 "window (default video)")

    def prepare(self, root: str, out: str) -> dict:
        started = time.time()
        mode = self.options.get("clip", "video")
        missing = [name for name in ("Annotations.txt", *LIST_FILES.values()) if not os.path.isfile(os.path.join(root, name))]
        if missing or not os.path.isdir(os.path.join(root, "AVE")):
            raise UserError(f"{root} is not an AVE_Dataset folder: it lacks {', '.join(missing + ([] if os.path.isdir(os.path.join(root, 'AVE')) else ['AVE/']))}. "
                            "Unpack AVE_Dataset.zip (github.com/YapengTian/AVE-ECCV18) and pass the folder that holds AVE/ and the list files")
        classes = sorted({e["category"] for e in read_events(os.path.join(root, "Annotations.txt"))})
        listed = [(part, e) for part, name in LIST_FILES.items() for e in read_events(os.path.join(root, name))]
        unknown = sorted({e["category"] for _, e in listed} - set(classes))
        if unknown:
            raise UserError(f"the list files name categories that Annotations.txt does not: {', '.join(unknown)}")
        entries, skipped = self._entries(listed, mode)
        clips = []
        with progress_bar(len(entries), "scan", unit="file") as bar:
            for entry in entries:
                rel = f"AVE/{entry['video_id']}.mp4"
                probe = probe_file(os.path.join(root, rel)) if os.path.isfile(os.path.join(root, rel)) else None
                problem = "missing: no such file" if probe is None else probe.problem
                if problem:
                    skipped.append({"path": rel, "reason": problem, "clip_id": entry["clip_id"], "splits": {SPLIT: entry["part"]}})
                else:
                    window = (entry["start"], entry["end"]) if mode == "event" else (None, None)
                    clips.append(clip_record(entry["clip_id"], {"video": (rel, probe)}, classes.index(entry["category"]),
                                             entry["category"], {SPLIT: entry["part"]}, group=entry["video_id"],
                                             start=window[0], end=window[1],
                                             meta={"video_id": entry["video_id"], "events": entry["events"]}))
                bar.update(1)
        if not clips:
            raise UserError(f"no usable video under {root}/AVE: {len(skipped)} list entries skipped, e.g. "
                            + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]))
        summary = {
            "corpus": self.name, "root": os.path.abspath(root), "clip": mode, "clips": len(clips), "classes": classes,
            "groups": len({c["group"] for c in clips}), "files_seen": len(entries), "skipped_files": len(skipped),
            "skipped_by_reason": dict(sorted(Counter(s["reason"].split(":")[0] for s in skipped).items())),
            "splits": split_summary(clips, [SPLIT], classes, group_word="videos"),
            "seconds": round(time.time() - started, 2),
        }
        write_manifest(out, clips, skipped, summary)
        return summary

    @staticmethod
    def _entries(listed: list[tuple[str, dict]], mode: str) -> tuple[list[dict], list[dict]]:
        """One entry per clip. Video mode: a video listed twice with one category is one clip;
        with two categories its label is ambiguous, so it is skipped (OGM-GE drops it too)."""
        skipped: list[dict] = []
        if mode == "event":
            entries, seen = [], Counter()
            for part, e in listed:
                cid = safe_clip_id(f"{e['video_id']}_{int(e['start'])}_{int(e['end'])}")
                seen[cid] += 1
                if seen[cid] > 1:
                    cid = f"{cid}_{seen[cid]}"
                entries.append({**e, "part": part, "clip_id": cid, "events": [[e["start"], e["end"]]]})
            return entries, skipped
        by_video: dict[str, list[tuple[str, dict]]] = {}
        for part, e in listed:
            by_video.setdefault(e["video_id"], []).append((part, e))
        entries = []
        for vid, items in by_video.items():
            cid = safe_clip_id(vid)
            categories = {e["category"] for _, e in items}
            parts = {p for p, _ in items}
            if len(categories) > 1 or len(parts) > 1:
                why = (f"video holds events of {len(categories)} categories ({', '.join(sorted(categories))})" if len(categories) > 1
                       else f"video is listed in {' and '.join(sorted(parts))}")
                skipped.append({"path": f"AVE/{vid}.mp4", "clip_id": cid, "splits": {SPLIT: items[0][0]},
                                "reason": f"ambiguous in --clip video: {why}; --clip event keeps its events"})
                continue
            part, first = items[0]
            entries.append({**first, "part": part, "clip_id": cid, "events": [[e["start"], e["end"]] for _, e in items]})
        return entries, skipped
