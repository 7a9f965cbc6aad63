"""``folder``: any folder of videos plus a CSV ``path,label[,split][,start,end]``.

Paths are relative to ``--root``; the audio is the video's own track, or a WAV next to the
video with the same stem (``a/b.mp4`` + ``a/b.wav``). Extra CSV columns (speaker, actor, …)
go into each record's ``meta``; ``--group-by COLUMN`` makes the seeded split keep each
value of that column in one part. Splits come from the CSV's ``split`` column when it has
one, else from a seeded stratified split (``--val-fraction``, ``--test-fraction``).
The split is named ``main``.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import time
from collections import Counter

from avbalance.errors import UserError
from avbalance.progress import progress_bar
from manifests.io import split_summary, write_manifest
from manifests.probe import probe_file
from manifests.record import clip_record, safe_clip_id
from pipelines.recipes.base import RECIPES, Recipe

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".flv", ".avi")
PART_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
SPLIT = "main"


@RECIPES.register("folder")
class Folder(Recipe):
    """Any labelled folder of videos (the example in docs/recipes.md)."""

    description = "any folder of videos (mp4, mkv, webm, flv, avi) with a path,label[,split][,start,end] CSV"
    root_help = "folder the CSV's paths are relative to"
    default_split = SPLIT

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from avbalance.ranges import Allowed, arg

        parser.add_argument("--labels", required=True, help="CSV with a header: path,label and optionally split, start, end "
                            "and any other columns (paths relative to --root)")
        parser.add_argument("--val-fraction", type=arg(float, Allowed(lo=0, hi=1, hi_open=True)), default=0.1,
                            help="share of each class for validation when the CSV has no split column (default 0.1)")
        parser.add_argument("--test-fraction", type=arg(float, Allowed(lo=0, hi=1, hi_open=True)), default=0.2,
                            help="share of each class for test when the CSV has no split column (default 0.2)")
        parser.add_argument("--group-by", metavar="COLUMN", default=None,
                            help="CSV column whose values never straddle two parts, e.g. speaker (default: none, clips split freely)")
        parser.add_argument("--split-seed", type=arg(int, Allowed(lo=0)), default=0, help="seed of the split (default 0)")

    def prepare(self, root: str, out: str) -> dict:
        started = time.time()
        if not os.path.isdir(root):
            raise UserError(f"--root {root} is not a folder")
        rows = read_labels(self.options["labels"], self.options.get("group_by"))
        classes = sorted({r["label"] for r in rows})
        if len(classes) < 2:
            raise UserError(f"{self.options['labels']} names {len(classes)} class(es); a classifier needs at least 2")
        splits = csv_splits(rows) if "split" in rows[0] else seeded_split(
            rows, self.options.get("val_fraction", 0.1), self.options.get("test_fraction", 0.2),
            self.options.get("group_by"), self.options.get("split_seed", 0))
        clips, skipped = [], []
        with progress_bar(len(rows), "scan", unit="file") as bar:
            for row, part in zip(rows, splits):
                record, problem = self._record(root, row, part, classes)
                if problem:
                    skipped.append({"path": row["path"], "reason": problem, "clip_id": row["clip_id"], "splits": {SPLIT: part}})
                else:
                    clips.append(record)
                bar.update(1)
        if not clips:
            examples = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
            raise UserError(f"no usable video among the {len(rows)} rows of {self.options['labels']}, e.g. {examples}")
        summary = {
            "corpus": self.name, "root": os.path.abspath(root), "labels": os.path.abspath(self.options["labels"]),
            "clips": len(clips), "classes": classes, "files_seen": len(rows),
            "split_from": "csv" if "split" in rows[0] else f"seeded (seed {self.options.get('split_seed', 0)})",
            "skipped_files": len(skipped),
            "skipped_by_reason": dict(sorted(Counter(s["reason"].split(":")[0] for s in skipped).items())),
            "audio_from_video_track": sum("wav" not in c["files"] for c in clips),
            "splits": split_summary(clips, [SPLIT], classes),
            "seconds": round(time.time() - started, 2),
        }
        write_manifest(out, clips, skipped, summary)
        return summary

    def _record(self, root: str, row: dict, part: str, classes: list[str]) -> tuple[dict | None, str | None]:
        """The record of one CSV row, or why the row cannot be used."""
        rel = row["path"]
        path = os.path.join(root, rel)
        if os.path.splitext(rel)[1].lower() not in VIDEO_EXTS:
            return None, f"not a video file: extension must be one of {', '.join(VIDEO_EXTS)}"
        if not os.path.isfile(path):
            return None, "missing: no such file under --root"
        probe = probe_file(path)
        if probe.problem:
            return None, probe.problem
        files = {"video": (rel, probe)}
        wav = os.path.splitext(rel)[0] + ".wav"
        if os.path.isfile(os.path.join(root, wav)):
            wav_probe = probe_file(os.path.join(root, wav))
            if not wav_probe.problem:  # a broken sidecar: fall back to the video's own track
                files["wav"] = (wav, wav_probe)
        group = row.get("group")
        return clip_record(row["clip_id"], files, classes.index(row["label"]), row["label"], {SPLIT: part},
                           group=group, start=row.get("start"), end=row.get("end"), meta=row["extra"] or None), None


def read_labels(path: str, group_by: str | None) -> list[dict]:
    """The CSV's rows: path, label, clip_id, optional split/start/end/group, extra columns."""
    if not os.path.isfile(path):
        raise UserError(f"--labels {path} is not a file; give a CSV with a header path,label[,split][,start,end]")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise UserError(f"{path}: the header must name path and label columns (found {', '.join(header) or 'none'}); "
                            "the format is path,label[,split][,start,end]")
        if group_by and group_by not in header:
            raise UserError(f"--group-by {group_by}: {path} has no such column (columns: {', '.join(header)})")
        rows, seen = [], {}
        for line, raw in enumerate(reader, start=2):
            raw = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            row = {"path": raw["path"], "label": raw["label"], "line": line}
            if not row["path"] or not row["label"]:
                raise UserError(f"{path} line {line}: path and label must not be empty")
            for key in ("start", "end"):
                if raw.get(key):
                    try:
                        row[key] = float(raw[key])
                    except ValueError:
                        raise UserError(f"{path} line {line}: {key} {raw[key]!r} is not a number of seconds") from None
            if "start" in row and "end" in row and not row["end"] > row["start"] >= 0:
                raise UserError(f"{path} line {line}: the window {row['start']:g}-{row['end']:g} s is empty or negative")
            if "split" in header:
                part = PART_NAMES.get(raw["split"].lower())
                if part is None:
                    raise UserError(f"{path} line {line}: split {raw['split']!r} is not train, val or test")
                row["split"] = part
            if group_by:
                row["group"] = raw[group_by]
            row["extra"] = {k: v for k, v in raw.items() if k not in ("path", "label", "split", "start", "end")}
            stem = safe_clip_id(os.path.splitext(row["path"])[0])
            if "start" in row or "end" in row:  # one file, several windows: several clips
                stem += f"_{round(row.get('start', 0) * 1000)}_{round(row.get('end', 0) * 1000)}"
            if stem in seen:
                raise UserError(f"{path} lines {seen[stem]} and {line} name the same clip ({row['path']}, same window)")
            seen[stem] = line
            row["clip_id"] = stem
            rows.append(row)
    if not rows:
        raise UserError(f"{path} has a header but no rows")
    return rows


def csv_splits(rows: list[dict]) -> list[str]:
    return [r["split"] for r in rows]


def seeded_split(rows: list[dict], val: float, test: float, group_by: str | None, seed: int) -> list[str]:
    """train/val/test per row, stratified by label; with ``group_by``, whole groups move together
    (groups are dealt in a seeded order to the part furthest below its share). Computed over
    every CSV row, usable or not, so a broken file never reshuffles the others."""
    if val + test >= 1:
        raise UserError(f"--val-fraction {val} + --test-fraction {test} leave nothing to train on")
    rng = random.Random(seed)
    shares = {"test": test, "val": val, "train": 1 - val - test}
    if not group_by:
        parts = [""] * len(rows)
        by_label: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_label.setdefault(r["label"], []).append(i)
        for label in sorted(by_label):
            idx = by_label[label]
            rng.shuffle(idx)
            n_test, n_val = round(len(idx) * test), round(len(idx) * val)
            for k, i in enumerate(idx):
                parts[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
        return parts
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["group"], []).append(i)
    order = sorted(groups)
    rng.shuffle(order)
    filled = dict.fromkeys(shares, 0)
    assign: dict[str, str] = {}
    for k, g in enumerate(order):
        wanting = [p for p in shares if shares[p] > 0 and filled[p] == 0]
        # Each part with a share gets a group first (while groups last), then the part with
        # the largest shortfall against its share takes the next one.
        part = wanting[0] if wanting and len(order) - k >= len(wanting) else max(shares, key=lambda p: shares[p] * len(rows) - filled[p])
        assign[g] = part
        filled[part] += len(groups[g])
    return [assign[r["group"]] for r in rows]
