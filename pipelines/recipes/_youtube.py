"""Shared by the YouTube-clip recipes (Kinetics-Sounds, VGGSound): find the clips a user
downloaded, named as the usual download tools name them, and report the ones that are gone.

Recognised names (any folder depth below the root, extension mp4, mkv, webm, avi or flv):

    <ytid>_<start:06d>_<end:06d>.mp4   Kinetics downloaders and the CVDF tarballs
    <ytid>_<start:06d>.mp4             VGGSound's own example naming (audiosetdl)
    <ytid>_<start>.mp4                 OGM-GE's VGGSound / Kinetics-Sounds lists
    <ytid>.mp4                         the whole YouTube video: the list's window is cut out

A YouTube id is 11 characters of ``[A-Za-z0-9_-]``, so the split after it is unambiguous.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

CLIP_NAME = re.compile(r"^(?P<ytid>[A-Za-z0-9_-]{11})(?:_(?P<start>\d+)(?:_(?P<end>\d+))?)?\.(?:mp4|mkv|webm|avi|flv)$",
                       re.IGNORECASE)
MISSING = "not downloaded: no file for this YouTube id and start time under the root"


@dataclass
class ClipIndex:
    """Downloaded files by (YouTube id, start second); whole videos under (id, None)."""

    by_key: dict[tuple[str, int | None], str]
    files_seen: int
    unparsed: list[str]  # media files whose name follows none of the schemes

    def find(self, ytid: str, start: int, seconds: float) -> tuple[str, tuple[float, float] | None] | None:
        """(path relative to the root, window in that file or None) for the clip, or None."""
        rel = self.by_key.get((ytid, start))
        if rel is not None:
            return rel, None  # a cut clip: the whole file is the window
        rel = self.by_key.get((ytid, None))
        if rel is not None:
            return rel, (float(start), float(start) + seconds)
        return None


def index_clips(root: str) -> ClipIndex:
    """Walk ``root`` once (sorted, so the first of two copies of a clip wins every time)."""
    by_key: dict[tuple[str, int | None], str] = {}
    unparsed, seen = [], 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith((".mp4", ".mkv", ".webm", ".avi", ".flv")):
                continue
            seen += 1
            rel = os.path.relpath(os.path.join(folder, name), root)
            match = CLIP_NAME.match(name)
            if match is None:
                unparsed.append(rel)
                continue
            start = int(match["start"]) if match["start"] is not None else None
            by_key.setdefault((match["ytid"], start), rel)
    return ClipIndex(by_key, seen, unparsed)


def clip_id(ytid: str, start: int) -> str:
    """``<ytid>_<start:06d>``: unique per clip, no dots (a WebDataset key)."""
    return f"{ytid}_{start:06d}"


def held_out(key: str, fraction: float) -> bool:
    """A fixed pseudo-random choice of ``fraction`` of the keys (sha1, no seed to forget)."""
    return fraction > 0 and int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def missing_counts(skipped: list[dict], split: str, reason: str = MISSING) -> dict[str, int]:
    """Per part: how many clips the split lists that are missing (skipped for ``reason``)."""
    counts: dict[str, int] = {}
    for s in skipped:
        part = s.get("splits", {}).get(split)
        if part is not None and s["reason"] == reason:
            counts[part] = counts.get(part, 0) + 1
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class ListedClip:
    """One row of a published list: a 10 s window of a YouTube video with its label and part."""

    ytid: str
    start: int
    label: str
    part: str  # train | val | test


def build_manifest(root: str, listed: list[ListedClip], classes: list[str], split: str, seconds: float,
                   val_fraction: float) -> tuple[list[dict], list[dict], ClipIndex]:
    """Manifest records for the listed clips found under ``root``; the others are skipped
    entries with their clip id and part (so coverage counts them) and the reason. A train
    clip goes to ``val`` when its YouTube id is among the held-out ``val_fraction``."""
    from manifests.probe import probe_file
    from manifests.record import clip_record

    index = index_clips(root)
    label_of = {c: i for i, c in enumerate(classes)}
    clips, skipped, seen = [], [], set()
    for item in listed:
        cid = clip_id(item.ytid, item.start)
        part = "val" if item.part == "train" and held_out(item.ytid, val_fraction) else item.part
        entry = {"clip_id": cid, "splits": {split: part}}
        if cid in seen:
            skipped.append({**entry, "path": f"{cid}.mp4", "reason": "listed twice: the first row is kept"})
            continue
        seen.add(cid)
        found = index.find(item.ytid, item.start, seconds)
        if found is None:
            skipped.append({**entry, "path": f"{cid}.mp4", "reason": MISSING, "absent": True})
            continue
        rel, window = found
        probe = probe_file(os.path.join(root, rel))
        if probe.problem:
            skipped.append({**entry, "path": rel, "reason": probe.problem})
            continue
        clips.append(clip_record(cid, {"video": (rel, probe)}, label_of[item.label], item.label, {split: part},
                                 group=item.ytid, start=window[0] if window else None, end=window[1] if window else None,
                                 meta={"youtube_id": item.ytid, "start": item.start}))
    return clips, skipped, index


def summarise(corpus: str, root: str, classes: list[str], clips: list[dict], skipped: list[dict], index: ClipIndex,
              split: str, started: float, **extra: object) -> dict:
    """The manifest summary: counts per split, part and class, and what is missing, per part."""
    import time

    from manifests.io import split_summary

    reasons: dict[str, int] = {}
    for s in skipped:
        key = s["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "corpus": corpus,
        "root": os.path.abspath(root),
        "classes": list(classes),
        "clips": len(clips),
        "files_seen": index.files_seen,
        "unrecognised_files": index.unparsed[:20],
        "unrecognised_file_count": len(index.unparsed),
        "skipped_files": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "missing": {split: missing_counts(skipped, split)},
        "splits": split_summary(clips, [split], classes, group_word="videos"),
        **extra,
        "seconds": round(time.time() - started, 2),
    }
