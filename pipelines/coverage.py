"""Per-part coverage of a split: the clips its list names, the clips written, the ids missing
and why. ``pack`` stores it in ``shards.json`` (``coverage``), ``preprocess`` prints it, and
``train`` warns when a part it reads is incomplete: a test part that lost clips is no
longer the published split, and its results stop being comparable with papers.
"""

from __future__ import annotations

import os

from avbalance.shard_format import NOT_IN_CORPUS, short_reason
from manifests.schema import parse_clip_name
from manifests.splits import VAVL_SPLITS, ogm_split, vavl_split



def named_clips(split: str, clips: list[dict], skipped: list[dict]) -> dict[str, str]:
    """Clip id -> part for every clip the split's list names.

    ``ogm`` and ``vavl1..5`` are published lists; a ``kfold`` split names every clip of the
    corpus whose actor is in the fold, including clips whose files the manifest skipped.
    """
    if split == "ogm":
        return dict(ogm_split())
    if split in VAVL_SPLITS:
        return dict(vavl_split(VAVL_SPLITS.index(split) + 1))
    named = {c["clip_id"]: c["splits"][split] for c in clips if split in c["splits"]}
    actor_part = {c["actor"]: c["splits"][split] for c in clips if split in c["splits"]}
    for s in skipped:
        stem = os.path.splitext(os.path.basename(s["path"]))[0]
        try:
            actor = parse_clip_name(stem).actor
        except ValueError:
            continue  # a file outside the naming scheme belongs to no split
        if actor in actor_part:
            named.setdefault(stem, actor_part[actor])
    return named


def coverage(named: dict[str, str], written: set[str], reasons: dict[str, str]) -> dict[str, dict]:
    """Part -> {"named", "written", "missing": {reason: [ids]}}; ``reasons`` holds why a clip
    of the corpus gave no sample (clips absent from ``reasons`` are not in the corpus)."""
    out: dict[str, dict] = {}
    for cid, part in sorted(named.items()):
        row = out.setdefault(part, {"named": 0, "written": 0, "missing": {}})
        row["named"] += 1
        if cid in written:
            row["written"] += 1
        else:
            row["missing"].setdefault(reasons.get(cid, NOT_IN_CORPUS), []).append(cid)
    return {p: out[p] for p in sorted(out, key=("train", "val", "test").index)}


def table_lines(split: str, cov: dict[str, dict]) -> list[str]:
    """The coverage of one split as aligned text lines, missing ids counted by reason."""
    lines = [f"  {split}: part     named  written  missing"]
    for part, row in cov.items():
        missing = row["named"] - row["written"]
        why = "; ".join(f"{len(ids)} {short_reason(reason)}" for reason, ids in sorted(row["missing"].items(), key=lambda kv: -len(kv[1])))
        lines.append(f"  {'':{len(split)}}  {part:6s} {row['named']:7d}  {row['written']:7d}  {missing:7d}" + (f"  ({why})" if why else ""))
    return lines
