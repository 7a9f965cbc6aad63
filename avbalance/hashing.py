"""File digests, shared by the shard index, shard verification and pretrained-weight records."""

from __future__ import annotations

import hashlib
from typing import BinaryIO


def sha256_stream(fh: BinaryIO) -> str:
    """The hex sha256 of a stream's bytes, read in 1 MiB blocks (a remote shard is never held whole)."""
    digest = hashlib.sha256()
    while block := fh.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)
