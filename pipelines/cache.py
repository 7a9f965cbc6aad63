"""Per-clip, per-stage output cache: ``cache/<stage>/<clip>-<key16>.npz`` or ``.fail.json``.

Files are written to a temporary name and renamed (or uploaded whole, on object stores),
so a killed run never leaves a file that looks complete. Failures are cached too: a re-run
with the same config redoes nothing.
"""

from __future__ import annotations

import io
import json

import numpy as np

from pipelines.storage import Storage


class ClipCache:
    def __init__(self, storage: Storage, root: str = "cache") -> None:
        self.storage = storage
        self.root = root
        self._listing: dict[str, set[str]] | None = None

    def _base(self, stage: str, clip_id: str, key: str) -> str:
        return f"{self.root}/{stage}/{clip_id}-{key[:16]}"

    def scan(self, stages: list[str]) -> None:
        """List each stage folder once; ``done`` and ``failure`` then answer from the listing
        (one request per stage instead of two per clip, on remote storage)."""
        self._listing = {s: set(self.storage.listdir(f"{self.root}/{s}")) for s in stages}

    def _exists(self, stage: str, rel: str) -> bool:
        if self._listing is not None and stage in self._listing:
            return rel.rsplit("/", 1)[-1] in self._listing[stage]
        return self.storage.exists(rel)

    def done(self, stage: str, clip_id: str, key: str) -> bool:
        return self._exists(stage, self._base(stage, clip_id, key) + ".npz")

    def failure(self, stage: str, clip_id: str, key: str) -> str | None:
        rel = self._base(stage, clip_id, key) + ".fail.json"
        if not self._exists(stage, rel):
            return None
        return json.loads(self.storage.read_bytes(rel))["reason"]

    def save(self, stage: str, clip_id: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.storage.write_bytes(self._base(stage, clip_id, key) + ".npz", buf.getvalue())

    def save_failure(self, stage: str, clip_id: str, key: str, reason: str) -> None:
        data = json.dumps({"clip_id": clip_id, "stage": stage, "reason": reason}).encode()
        self.storage.write_bytes(self._base(stage, clip_id, key) + ".fail.json", data)

    def load(self, stage: str, clip_id: str, key: str) -> dict[str, np.ndarray]:
        data = self.storage.read_bytes(self._base(stage, clip_id, key) + ".npz")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
