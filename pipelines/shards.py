"""Shard writing: deterministic tar files, written to a temporary name and renamed when
complete, and the ``shards.json`` index written last."""

from __future__ import annotations

import io
import json
import os
import tarfile

from avbalance.hashing import sha256_file

SCHEMA_VERSION = 2  # 2: per-sample ``quality`` flags; ``coverage`` and per-part ``quality`` in shards.json
MAX_SHARD_BYTES = 512 * 1024 * 1024


class ShardWriter:
    """Writes samples ({"__key__": str, "<name>.<ext>": bytes}) into ``{prefix}-{i:06d}.tar``.

    Tar headers carry no time, user or group, so the same samples give the same bytes.
    """

    def __init__(self, directory: str, prefix: str, samples_per_shard: int, max_bytes: int = MAX_SHARD_BYTES) -> None:
        self.directory = directory
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_bytes = max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._fh = None
        self._count = 0
        self._bytes = 0
        self._keys: set[str] | None = None

    def write(self, sample: dict[str, bytes | str]) -> None:
        keys = {k for k in sample if k != "__key__"}
        if self._keys is None:
            self._keys = keys
        elif keys != self._keys:
            raise ValueError(f"sample {sample['__key__']} has keys {sorted(keys)}, others {sorted(self._keys)}")
        size = sum(len(v) for k, v in sample.items() if k != "__key__")
        if self._tar is None or self._count >= self.samples_per_shard or (self._count and self._bytes + size > self.max_bytes):
            self._close_shard()
            self._open_shard()
        for name in sorted(keys):
            data = sample[name]
            info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def _open_shard(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = os.path.join(self.directory, name)
        self._fh = open(self._path + ".tmp", "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self._name = name
        self._count = 0
        self._bytes = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._path + ".tmp", self._path)
        self.shards.append({"name": self._name, "samples": self._count, "bytes": os.path.getsize(self._path), "sha256": sha256_file(self._path)})
        self._tar = None

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (after an error): no partial file remains."""
        if self._tar is not None:
            try:
                self._fh.close()
            finally:
                if os.path.exists(self._path + ".tmp"):
                    os.remove(self._path + ".tmp")
            self._tar = None

    @property
    def keys(self) -> list[str]:
        return sorted(self._keys or [])


def read_index(directory: str) -> dict | None:
    path = os.path.join(directory, "shards.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_index(directory: str, index: dict) -> None:
    tmp = os.path.join(directory, "shards.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(directory, "shards.json"))
