"""A shard set's index (``shards.json``) as the trainer reads it: finding the sets below a
folder, reading the index (a folder or a URL), a part's shard files checked against it,
the ids ``data.exclude_quality`` drops, and the checks a run makes before it trains.

Reads and checks only: no shard's contents (``trainer/shard_reader.py``), no loader
(``trainer/loader.py``). A caller that needs the index several times reads it once and
passes it on (``index=``); nothing here caches it.
"""

from __future__ import annotations

import os

from avbalance import remote, shard_format
from avbalance.errors import UserError
from avbalance.invocation import prog
from avbalance.shard_format import SOURCES, incomplete_parts
from trainer.corrupt import _warn_once
from trainer.data_config import DataConfig


def split_folders(folder: str) -> list[str]:
    """Shard sets below ``folder`` when it is a preprocess output (``OUT/shards/<split>``) or its ``shards/``."""
    found = []
    for parent in (os.path.join(folder, "shards"), folder):
        if os.path.isdir(parent):
            found += [os.path.join(parent, d) for d in sorted(os.listdir(parent))
                      if os.path.exists(os.path.join(parent, d, shard_format.INDEX))]
    return found


def read_index(shards: str) -> dict:
    """``shards.json`` of the set at ``shards`` (a folder or a URL: avbalance.remote)."""
    index = shard_format.read_index(shards)
    if index is None:
        splits = [] if remote.is_remote(shards) else split_folders(shards)
        if splits:
            raise UserError(f"{shards} holds shard sets, one per split, but is not one itself: pass one of "
                            f"{', '.join(splits)} as --shards")
        raise UserError(f"no shards.json in {shards}: not a complete shard set; run `{prog()} preprocess` first")
    return index


def shard_urls(shards: str, part: str, on_corrupt: str = "error", index: dict | None = None) -> tuple[list[str], int]:
    """The shard files of one part and its sample count, checked against the index: every
    listed shard must exist with the size the index records (cheap: no reading). ``index``:
    the set's ``shards.json`` when the caller has read it already (else it is read here)."""
    if index is None:
        index = read_index(shards)
    if part not in index["parts"]:
        raise UserError(f"{shards} has no {part!r} part (parts: {', '.join(index['parts'])})")
    listed = index["parts"][part]["shards"]
    urls = [remote.join(shards, s["name"]) for s in listed]
    sizes = remote.sizes(urls)  # a stat per shard; HEAD requests at a URL
    missing = [u for u, size in zip(urls, sizes) if size is None]
    if missing:
        raise UserError(f"{len(missing)} shard(s) listed in {shards}/shards.json are missing, e.g. {missing[0]}")
    for entry, url, size in zip(listed, urls, sizes):
        if "bytes" in entry and size != entry["bytes"] and size != -1:  # -1: pipe:, size unknown
            message = (f"shard {url} is {size} bytes but shards.json records {entry['bytes']}: it is damaged or cut "
                       f"short. Check the set with `{prog()} verify-shards {shards}` and re-create it with "
                       f"`{prog()} preprocess` (finished stages are cached)")
            if on_corrupt != "skip":
                raise UserError(message + "; data.on_corrupt=skip reads what it can and counts the samples lost")
            _warn_once(url, "warning: " + message + "; data.on_corrupt=skip: its unreadable samples are skipped and counted")
    return urls, index["parts"][part]["samples"]


def excluded_ids(index: dict, part: str, flags: tuple[str, ...]) -> dict[str, list[str]]:
    """Flag -> the ids of ``part`` that ``data.exclude_quality`` drops for it (from shards.json)."""
    if not flags:
        return {}
    quality = index["parts"][part].get("quality")
    if quality is None:
        raise UserError(f"data.exclude_quality needs shards with quality flags; {index.get('split')} shards were written "
                        f"by an older version (schema {index.get('schema_version')}): re-run `{prog()} preprocess`")
    return {f: quality[f] for f in flags if quality.get(f)}


def preflight(shards: str, parts: list[str], cfg: DataConfig) -> list[str]:
    """Checks before training, on every part it will read: shard sizes (errors, or warnings
    with ``on_corrupt="skip"``), parts missing clips their split list names, and what
    ``exclude_quality`` drops. Returns the lines to show the user."""
    index = read_index(shards)
    lines = []
    for part in dict.fromkeys(parts):
        shard_urls(shards, part, cfg.on_corrupt, index)
    lines += [f"warning: {shards}: {line}" for line in incomplete_parts(index, list(dict.fromkeys(parts)))]
    if cfg.exclude_quality:
        for part in dict.fromkeys(parts):
            by_flag = excluded_ids(index, part, cfg.exclude_quality)
            dropped = len({i for ids in by_flag.values() for i in ids})
            counts = ", ".join(f"{f} {len(ids)}" for f, ids in by_flag.items()) or "none flagged"
            lines.append(f"data: part {part!r} drops {dropped} of {index['parts'][part]['samples']} samples "
                         f"(data.exclude_quality: {counts})")
    return lines


def check_sources(shards: str, cfg: DataConfig, index: dict | None = None) -> None:
    """Every modality's source is known and stored in the set (``index``: its ``shards.json``
    when the caller has read it already)."""
    keys = set((read_index(shards) if index is None else index)["keys"])
    for modality, source in cfg.modalities.items():
        if source not in SOURCES:
            raise UserError(f"modality {modality!r}: unknown source {source!r}; choose from {', '.join(SOURCES)}")
        if SOURCES[source] not in keys:
            raise UserError(f"modality {modality!r} needs {SOURCES[source]}, which the shards in {shards} do not hold "
                            f"(keys: {', '.join(sorted(keys))})")
