"""Read and write manifests: ``clips.jsonl`` (one clip a line), ``skipped.jsonl``, ``summary.json``."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable

from avbalance.errors import UserError
from avbalance.invocation import prog


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary sibling, then rename: readers never see a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def split_summary(clips: list[dict], split_names: list[str], classes: list[str] | tuple[str, ...],
                  class_key: str = "label_name", group_key: str = "group", group_word: str = "groups") -> dict:
    """Per split and part: clip count, group count (actors, speakers, videos: ``group_word``;
    left out when no clip has ``group_key``) and clips per class (every class, 0 included)."""
    out: dict[str, dict] = {}
    for name in split_names:
        parts: dict[str, dict] = {}
        for clip in clips:
            part = clip["splits"].get(name)
            if part is None:
                continue
            entry = parts.setdefault(part, {"clips": 0, "groups": set(), "classes": Counter()})
            entry["clips"] += 1
            if clip.get(group_key) is not None:
                entry["groups"].add(clip[group_key])
            entry["classes"][clip[class_key]] += 1
        out[name] = {
            part: {
                "clips": e["clips"],
                **({group_word: len(e["groups"])} if e["groups"] else {}),
                "classes": {c: e["classes"].get(c, 0) for c in classes},
            }
            for part, e in sorted(parts.items(), key=lambda kv: ("train", "val", "test").index(kv[0]))
        }
    return out


def write_manifest(out_dir: str, clips: list[dict], skipped: list[dict], summary: dict) -> None:
    """Write the three manifest files; summary.json last, as the done-marker."""
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "clips.jsonl"), clips)
    write_jsonl(os.path.join(out_dir, "skipped.jsonl"), skipped)
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_manifest(out_dir: str) -> tuple[list[dict], dict]:
    """Load ``clips.jsonl`` and ``summary.json``, or say how to make them."""
    clips_path = os.path.join(out_dir, "clips.jsonl")
    summary_path = os.path.join(out_dir, "summary.json")
    if not (os.path.exists(clips_path) and os.path.exists(summary_path)):
        raise UserError(f"no complete manifest in {out_dir}; run `{prog()} manifest CORPUS --root ROOT --out {out_dir}`")
    with open(summary_path, encoding="utf-8") as fh:
        return read_jsonl(clips_path), json.load(fh)
