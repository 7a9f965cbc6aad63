"""The generic manifest schema: one JSON line per clip in ``clips.jsonl``, for every corpus.

Required:
  ``clip_id``     unique, no dots or slashes (it becomes the WebDataset ``__key__``)
  ``files``       {"video": path relative to the root, "wav": optional sidecar audio}
  ``label``       int, the index of ``label_name`` in the summary's ``classes``
  ``label_name``  str
  ``splits``      {split name: "train" | "val" | "test"}; a clip absent from a split has no entry
Optional:
  ``group``       speaker, actor or source video: what a disjoint split keeps together
  ``start``, ``end``  the clip's window in the file, in seconds (decode honours it)
  ``meta``        recipe-specific metadata, copied into each shard sample's json
  ``bytes``, ``probe``  file sizes and what the header probe learned (``manifests/probe.py``)
CREMA-D records keep their historical top-level fields (actor, emotion, ...) besides these.
"""

from __future__ import annotations

import re
from typing import Any

from manifests.probe import Probe

PARTS = ("train", "val", "test")
_BAD_ID = re.compile(r"[./\\\s]")


def safe_clip_id(text: str) -> str:
    """A clip id from a path or name: dots, slashes and spaces become ``_`` (WebDataset keys
    split at the first dot, and a key is a tar member prefix)."""
    return _BAD_ID.sub("_", text)


def clip_record(clip_id: str, files: dict[str, tuple[str, Probe]], label: int, label_name: str,
                splits: dict[str, str], group: str | None = None, start: float | None = None,
                end: float | None = None, meta: dict[str, Any] | None = None) -> dict:
    """One manifest line in the generic schema (see the module docstring)."""
    if _BAD_ID.search(clip_id):
        raise ValueError(f"clip id {clip_id!r} holds a dot, slash or space; use safe_clip_id()")
    bad = {s: p for s, p in splits.items() if p not in PARTS}
    if bad:
        raise ValueError(f"clip {clip_id}: parts must be train, val or test, got {bad}")
    record: dict[str, Any] = {
        "clip_id": clip_id,
        "files": {m: rel for m, (rel, _) in sorted(files.items())},
        "bytes": {m: probe.size for m, (_, probe) in sorted(files.items())},
        "probe": {m: probe.info for m, (_, probe) in sorted(files.items()) if probe.info},
        "label": int(label),
        "label_name": label_name,
        "splits": dict(splits),
    }
    if group is not None:
        record["group"] = group
    if start is not None or end is not None:
        record["start"] = float(start or 0.0)
        if end is not None:
            record["end"] = float(end)
    if meta:
        record["meta"] = meta
    return record


def clip_window(clip: dict) -> tuple[float, float | None] | None:
    """The (start, end) window of a record, or None for the whole file."""
    if "start" not in clip and "end" not in clip:
        return None
    return float(clip.get("start", 0.0)), (float(clip["end"]) if clip.get("end") is not None else None)
