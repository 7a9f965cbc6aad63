"""Shard writing: deterministic tar files, written to a temporary name and renamed when
complete, and the ``shards.json`` index written last."""

from __future__ import annotations

import io
import json
import tarfile

from avbalance.shard_format import INDEX
from pipelines.storage import AtomicFile, Storage

MAX_SHARD_BYTES = 512 * 1024 * 1024


class ShardWriter:
    """Writes samples ({"__key__": str, "<name>.<ext>": bytes}) into ``{prefix}-{i:06d}.tar``.

    Tar headers carry no time, user or group, so the same samples give the same bytes.
    ``directory`` is a folder, or a path under ``storage`` when one is given; shard numbers
    start at ``first`` (a pack task writes one shard of a part).
    """

    def __init__(self, directory: str, prefix: str, samples_per_shard: int, max_bytes: int = MAX_SHARD_BYTES,
                 storage: Storage | None = None, first: int = 0) -> None:
        self.storage = storage or Storage(directory)
        self.directory = directory if storage is not None else ""
        self.first = first
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_bytes = max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._fh: AtomicFile | None = None
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
        name = f"{self.prefix}-{self.first + len(self.shards):06d}.tar"
        self._fh = self.storage.open_write(f"{self.directory}/{name}" if self.directory else name)
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self._name = name
        self._count = 0
        self._bytes = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._fh.commit()
        self.shards.append({"name": self._name, "samples": self._count, "bytes": self._fh.size, "sha256": self._fh.sha256.hexdigest()})
        self._tar = None

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (after an error): no partial file remains."""
        if self._tar is not None:
            self._fh.abort()
            self._tar = None

    @property
    def keys(self) -> list[str]:
        return sorted(self._keys or [])


def read_index(directory: str, storage: Storage | None = None) -> dict | None:
    """``shards.json`` of a folder, or of ``directory`` under ``storage`` (the writer's view,
    through the output's fsspec storage); None when absent. Readers use
    ``avbalance.shard_format.read_index``."""
    storage, rel = (storage, f"{directory}/{INDEX}") if storage is not None else (Storage(directory), INDEX)
    if not storage.exists(rel):
        return None
    return json.loads(storage.read_bytes(rel))


def write_index(directory: str, index: dict, storage: Storage | None = None) -> None:
    storage, rel = (storage, f"{directory}/{INDEX}") if storage is not None else (Storage(directory), INDEX)
    storage.write_bytes(rel, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
