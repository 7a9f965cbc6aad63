"""Where a preprocessing run keeps its cache and shards: a folder (local, or a mount every
node sees) or an fsspec URL (``file://``, ``s3://``, ``gs://``, ...).

Paths are relative to the run's ``--out`` and always use ``/``. A folder is written with
os calls, a temporary name and a rename, as before. A URL goes through fsspec: on object
stores a whole-object upload is atomic (the object appears complete or not at all), so
files are written in place; on ``file://`` a temporary name and a rename, as locally.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import IO

from avbalance.errors import UserError
from avbalance.remote import is_url


class Storage:
    """The output root of a run; picklable (Ray tasks and pool workers each get a copy)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") if is_url(root) else root
        self.url = is_url(root)
        self._fs = None

    def __getstate__(self) -> dict:
        return {"root": self.root, "url": self.url, "_fs": None}  # fsspec clients reconnect per process

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            try:
                self._fs = fsspec.core.url_to_fs(self.root)[0]
            except (ImportError, ValueError) as err:
                raise UserError(f"--out {self.root}: {err} (s3:// needs `pip install .[s3]`, gs:// `pip install .[gcs]`)") from None
        return self._fs

    def path(self, rel: str = "") -> str:
        """The full path or URL of ``rel`` (for messages and for local readers)."""
        if not rel:
            return self.root
        return f"{self.root}/{rel}" if self.url else os.path.join(self.root, *rel.split("/"))

    def _atomic_rename(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel)) if self.url else os.path.exists(self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        if self.url:
            self.fs.makedirs(self.path(rel), exist_ok=True)  # a no-op on object stores
        else:
            os.makedirs(self.path(rel), exist_ok=True)

    def listdir(self, rel: str) -> list[str]:
        """Names in the folder ``rel`` (empty when it does not exist)."""
        if not self.url:
            return os.listdir(self.path(rel)) if os.path.isdir(self.path(rel)) else []
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False)]
        except FileNotFoundError:
            return []

    def remove(self, rel: str) -> None:
        if self.url:
            self.fs.rm(self.path(rel))
        else:
            os.remove(self.path(rel))

    def rmtree(self, rel: str) -> None:
        if not self.url:
            shutil.rmtree(self.path(rel), ignore_errors=True)
        elif self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    def read_bytes(self, rel: str) -> bytes:
        if self.url:
            return self.fs.cat_file(self.path(rel))
        with open(self.path(rel), "rb") as fh:
            return fh.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write all of ``data``; a reader never sees a partial file."""
        sink = self.open_write(rel)
        try:
            sink.write(data)
        except BaseException:
            sink.abort()
            raise
        sink.commit()

    def open_write(self, rel: str) -> AtomicFile:
        """A file to stream into, published by ``commit()`` and dropped by ``abort()``."""
        if not self.url:
            os.makedirs(os.path.dirname(self.path(rel)) or ".", exist_ok=True)
            return AtomicFile(self.path(rel), None)
        if self._atomic_rename():
            self.fs.makedirs(self.path(rel).rsplit("/", 1)[0], exist_ok=True)
        return AtomicFile(self.path(rel), self.fs, rename=self._atomic_rename())


class AtomicFile:
    """Write-only stream that counts and hashes what passes through (a shard's size and sha256
    without reading it back, which matters on remote storage)."""

    def __init__(self, path: str, fs, rename: bool = True) -> None:
        self.path = path
        self._fs = fs
        self._target = f"{path}.tmp{os.getpid()}" if rename else path
        self._rename = rename
        self._fh: IO[bytes] = fs.open(self._target, "wb") if fs is not None else open(self._target, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._fh.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:  # tarfile asks where it is
        return self.size

    def commit(self) -> None:
        if self._fs is None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._target, self.path)
            return
        self._fh.close()
        if self._rename:
            self._fs.mv(self._target, self.path)

    def abort(self) -> None:
        """Drop what was written: no partial file remains under any name."""
        discard = getattr(self._fh, "discard", None)
        if self._fs is not None and not self._rename and discard is not None:
            discard()  # an unfinished multipart upload is cancelled, never published
            return
        self._fh.close()
        if self._fs is None:
            if os.path.exists(self._target):
                os.remove(self._target)
        elif self._fs.exists(self._target):
            self._fs.rm(self._target)
