"""``cli.py verify-shards DIR``: check a shard set against its ``shards.json``.

Sizes always (a stat per shard: catches a copy cut short), sha256 on request (reads every
byte: catches corruption that keeps the size). ``train`` runs the size check at start.
"""

from __future__ import annotations

import glob
import os

from avbalance.errors import UserError
from avbalance.progress import progress_bar
from avbalance.hashing import sha256_file
from pipelines.shards import read_index


def verify_shards(directory: str, hashes: bool = False) -> list[dict]:
    """One record per listed shard: {"part", "name", "status": ok|missing|size|sha256, "detail"}."""
    if not os.path.isdir(directory):
        raise UserError(f"{directory} is not a folder; verify-shards takes a shard set folder (OUT/shards/<split>)")
    index = read_index(directory)
    if index is None:
        found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(directory, "*", "shards.json"))
                       + glob.glob(os.path.join(directory, "shards", "*", "shards.json")))
        hint = f"; shard sets inside it: {', '.join(found)}" if found else ""
        raise UserError(f"no shards.json in {directory}: not a complete shard set{hint}")
    listed = [(part, entry) for part, v in index["parts"].items() for entry in v["shards"]]
    total = sum(e.get("bytes", 0) for _, e in listed) if hashes else len(listed)
    records = []
    with progress_bar(total, "verify", unit="B" if hashes else "shard", unit_scale=hashes) as bar:
        for part, entry in listed:
            path = os.path.join(directory, entry["name"])
            record = {"part": part, "name": entry["name"], "status": "ok", "detail": f"{entry.get('bytes')} bytes"}
            if not os.path.isfile(path):
                record.update(status="missing", detail="listed in shards.json, not on disk")
            elif "bytes" in entry and os.path.getsize(path) != entry["bytes"]:
                record.update(status="size", detail=f"{os.path.getsize(path)} bytes, shards.json records {entry['bytes']}: cut short or damaged")
            elif hashes and "sha256" in entry:
                digest = sha256_file(path)
                if digest != entry["sha256"]:
                    record.update(status="sha256", detail=f"sha256 {digest[:16]}..., shards.json records {entry['sha256'][:16]}...: damaged")
                else:
                    record["detail"] += ", sha256 ok"
            bar.update(entry.get("bytes", 0) if hashes else 1)
            records.append(record)
    names = {e["name"] for _, e in listed}
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".tar") and n not in names):
        records.append({"part": "-", "name": name, "status": "stray", "detail": "not listed in shards.json: not part of the set"})
    return records
