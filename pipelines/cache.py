"""Per-clip, per-stage output cache: ``cache/<stage>/<clip>-<key16>.npz`` or ``.fail.json``.

Files are written to a temporary name and renamed, so a killed run never leaves a file
that looks complete. Failures are cached too: a re-run with the same config redoes nothing.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np


class ClipCache:
    def __init__(self, root: str) -> None:
        self.root = root

    def _base(self, stage: str, clip_id: str, key: str) -> str:
        return os.path.join(self.root, stage, f"{clip_id}-{key[:16]}")

    def done(self, stage: str, clip_id: str, key: str) -> bool:
        return os.path.exists(self._base(stage, clip_id, key) + ".npz")

    def failure(self, stage: str, clip_id: str, key: str) -> str | None:
        path = self._base(stage, clip_id, key) + ".fail.json"
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)["reason"]

    def save(self, stage: str, clip_id: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        path = self._base(stage, clip_id, key) + ".npz"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        _atomic_write(path, buf.getvalue())

    def save_failure(self, stage: str, clip_id: str, key: str, reason: str) -> None:
        path = self._base(stage, clip_id, key) + ".fail.json"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _atomic_write(path, json.dumps({"clip_id": clip_id, "stage": stage, "reason": reason}).encode())

    def load(self, stage: str, clip_id: str, key: str) -> dict[str, np.ndarray]:
        with np.load(self._base(stage, clip_id, key) + ".npz", allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
