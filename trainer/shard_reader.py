"""Shards -> samples, a webdataset stage: each shard's tar members grouped by sample key
(``trainer/tar_members.py`` parses the tar), only the members the model reads, and the
samples ``data.exclude_quality`` drops left out (``_keep``).

A shard that cannot be read to its end becomes one damage record naming it and the sample
where reading stopped, not a traceback; what a record does (error, or skip and count) is
``trainer/corrupt.py``'s ``GuardedLoader``. Nothing here decodes a sample.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from typing import Iterator

from avbalance import remote
from trainer import tar_members


def _keep(keys: set[str], exclude: set[str]):
    """Only the members the model reads; samples ``data.exclude_quality`` drops are left out."""
    def stage(src):
        for sample in src:
            if sample.get("__key__") in exclude:
                continue
            yield {k: v for k, v in sample.items() if k in keys or k.startswith("__")}

    return stage


def read_shards(expected: dict[str, int], keys: set[str] | None = None):
    """Tar members -> samples ({"__key__", "__url__", member name: bytes}), shard by shard;
    with ``keys``, only those members are read (the others' bytes are skipped).

    A shard that cannot be read to its end (cut short, bad header) yields one damage record
    naming it, the sample key where reading stopped and how many samples it lost (from the
    index's per-shard ``expected`` counts), instead of a ``tarfile.ReadError`` traceback.
    """
    def wanted(path: str) -> bool:
        return keys is None or os.path.basename(path).partition(".")[2] in keys

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        read_any, unreadable = False, set()
        for item in src:
            url = item["url"]
            if url in unreadable and not read_any:
                # Training cycles its shards for ever: when they all fail, say so instead of spinning.
                yield {"__corrupt__": {"shard": url, "key": "(any)", "samples": 0, "fatal": True,
                                       "reason": "no shard this loader reads holds a readable sample"}}
                return
            count, key, current = 0, None, None
            try:
                with remote.open_stream(url) as fh:
                    for path, data in tar_members.members(fh, wanted):
                        key, _, name = os.path.basename(path).partition(".")
                        if current is not None and current["__key__"] != key:
                            yield current
                            count += 1
                            current = None
                        if current is None:
                            current = {"__key__": key, "__url__": url, "__pass__": item.get("pass", 0)}
                        if data is not None:
                            current[name] = data
                if current is not None:
                    yield current
                    count += 1
                read_any = read_any or count > 0
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                read_any = read_any or count > 0
                unreadable.add(url)
                total = expected.get(url)
                lost = f"{total - count} of its {total} samples" if total is not None else "the rest of its samples"
                yield {"__corrupt__": {"shard": url, "key": key or "(first sample)", "samples": max(1, (total or count + 1) - count),
                                       "reason": f"the shard cannot be read past this sample ({err}): it is cut short or "
                                                 f"damaged; {lost} are lost"}}

    return stage
