"""File digests, shared by the shard index, shard verification and pretrained-weight records."""

from __future__ import annotations

import hashlib


def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
