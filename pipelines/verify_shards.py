"""``cli.py verify-shards DIR|URL``: check a shard set against its ``shards.json``.

Sizes always (a stat per shard, a HEAD request at a URL: catches a copy cut short), sha256 on
request (streams every byte: catches corruption that keeps the size). ``train`` runs the
size check at start. Stray ``.tar`` files are looked for in local folders only (a URL
cannot be listed in general).
"""

from __future__ import annotations

import glob
import os

from avbalance import remote
from avbalance.errors import UserError
from avbalance.hashing import sha256_stream
from avbalance.progress import progress_bar
from avbalance.shard_format import read_index


def _index(directory: str) -> dict:
    if not remote.is_remote(directory) and not os.path.isdir(directory):
        raise UserError(f"{directory} is not a folder; verify-shards takes a shard set folder (OUT/shards/<split>) or its URL")
    index = read_index(directory)
    if index is None:
        found = [] if remote.is_remote(directory) else sorted(
            os.path.dirname(p) for p in glob.glob(os.path.join(directory, "*", "shards.json"))
            + glob.glob(os.path.join(directory, "shards", "*", "shards.json")))
        hint = f"; shard sets inside it: {', '.join(found)}" if found else ""
        raise UserError(f"no shards.json in {directory}: not a complete shard set{hint}")
    return index


def _check(path: str, entry: dict, hashes: bool) -> dict:
    """The status of one shard: ok, missing, size, sha256 or unreadable."""
    size = remote.size(path)
    if size is None:
        return {"status": "missing", "detail": "listed in shards.json, not found"}
    if "bytes" in entry and size not in (entry["bytes"], -1):
        return {"status": "size", "detail": f"{size} bytes, shards.json records {entry['bytes']}: cut short or damaged"}
    detail = f"{entry.get('bytes')} bytes"
    if hashes and "sha256" in entry:
        try:
            with remote.open_stream(path, cache=False) as fh:
                digest = sha256_stream(fh)
        except OSError as err:
            return {"status": "unreadable", "detail": f"cannot be read to its end: {err}"}
        if digest != entry["sha256"]:
            return {"status": "sha256", "detail": f"sha256 {digest[:16]}..., shards.json records {entry['sha256'][:16]}...: damaged"}
        detail += ", sha256 ok"
    return {"status": "ok", "detail": detail}


def verify_shards(directory: str, hashes: bool = False) -> list[dict]:
    """One record per listed shard: {"part", "name", "status": ok|missing|size|sha256|unreadable, "detail"}."""
    index = _index(directory)
    listed = [(part, entry) for part, v in index["parts"].items() for entry in v["shards"]]
    total = sum(e.get("bytes", 0) for _, e in listed) if hashes else len(listed)
    records = []
    with progress_bar(total, "verify", unit="B" if hashes else "shard", unit_scale=hashes) as bar:
        for part, entry in listed:
            records.append({"part": part, "name": entry["name"], **_check(remote.join(directory, entry["name"]), entry, hashes)})
            bar.update(entry.get("bytes", 0) if hashes else 1)
    if not remote.is_remote(directory):
        names = {e["name"] for _, e in listed}
        for name in sorted(n for n in os.listdir(directory) if n.endswith(".tar") and n not in names):
            records.append({"part": "-", "name": name, "status": "stray", "detail": "not listed in shards.json: not part of the set"})
    return records
