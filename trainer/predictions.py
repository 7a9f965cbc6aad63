"""A run's predictions on an evaluated part: ``RUN/logits_<part>.npz`` (no pickle).

Arrays: ``clip_id`` (unicode strings), ``label`` (int64) and ``logits`` (float32, N x C: the
fused logits of the evaluated checkpoint). They let a report combine runs after the fact
without training anything: the unimodal ensemble (experiments/ensemble.py) averages the
softmax outputs of the two unimodal controls of the same split and seed, clip by clip.

Clip ids travel between DDP ranks as fixed-width byte rows (``ids_to_tensor``), so gathering
them needs no pickled objects either.
"""

from __future__ import annotations

import os

import numpy as np
import torch

ID_BYTES = 256  # widest clip id carried between ranks


def ids_to_tensor(ids: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Clip ids as a (B, ID_BYTES) uint8 tensor, UTF-8, zero-padded."""
    rows = np.zeros((len(ids), ID_BYTES), np.uint8)
    for i, clip in enumerate(ids):
        raw = clip.encode("utf-8")
        if len(raw) > ID_BYTES:
            raise ValueError(f"clip id longer than {ID_BYTES} bytes: {clip[:40]}...")
        rows[i, :len(raw)] = np.frombuffer(raw, np.uint8)
    return torch.from_numpy(rows).to(device)


def tensor_to_ids(rows: np.ndarray) -> list[str]:
    """The inverse of ``ids_to_tensor`` (rows as numpy)."""
    return [bytes(r).rstrip(b"\0").decode("utf-8") for r in np.asarray(rows, np.uint8)]


def save_predictions(path: str, clip_id: list[str], label: np.ndarray, logits: np.ndarray) -> None:
    """Write ``logits_<part>.npz`` atomically (the keys ``evaluate(predictions=...)`` fills)."""
    label, logits = np.asarray(label, np.int64), np.asarray(logits, np.float32)
    if not (len(clip_id) == len(label) == len(logits)):
        raise ValueError(f"{len(clip_id)} clip ids, {len(label)} labels and {len(logits)} logit rows")
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, clip_id=np.asarray(clip_id, dtype=str), label=label, logits=logits)
    os.replace(tmp, path)


def load_predictions(path: str) -> dict[str, np.ndarray]:
    """``{"clip_id", "label", "logits"}`` as written by ``save_predictions``."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in ("clip_id", "label", "logits")}
