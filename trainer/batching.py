"""Samples -> batches: fixed shapes stacked (in a loader worker, into shared memory, a
``BatchPool`` slot where there is one), sequences padded with a mask, and the batching stage
that carries damage records along with the batches.

Nothing here decodes samples (``trainer/sample_decode.py``) or decides what a damage record
does (``trainer/corrupt.py``); the pool's slots themselves are ``trainer/batch_pool.py``'s.
"""

from __future__ import annotations

from typing import Iterator

import torch

from trainer.batch_pool import SLOTS_KEY, pooled_stack, worker_pool

SHARED_MIN_ELEMENTS = 1 << 16  # smaller batch tensors are stacked as usual (a segment each costs more than the copy)


def pad_stack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack along a new batch axis, padding axis 0 to the longest; mask True = real."""
    longest = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
    mask = torch.zeros(len(tensors), longest, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def stack(tensors: list[torch.Tensor], slots: list | None = None, where: tuple[str, str] = ("", "x")) -> torch.Tensor:
    """``torch.stack``; in a loader worker, straight into shared memory. A batch leaves the
    worker through shared memory, and a tensor already there is handed over as it is instead
    of being copied into a fresh segment: one write of the batch instead of two. With the
    loader's ``BatchPool`` the segment is one of the worker's reused slots (no new pages to
    fault in); the slot is recorded in ``slots`` with ``where`` the tensor sits in the batch."""
    info = torch.utils.data.get_worker_info()
    if info is None or tensors[0].numel() * len(tensors) < SHARED_MIN_ELEMENTS:
        return torch.stack(tensors)
    pool, worker = worker_pool() or (None, info.id)
    out, taken = pooled_stack(tensors, pool, worker)
    if taken is not None and slots is not None:
        slots.append((worker, *taken, *where))
    return out


def collate(samples: list[dict]) -> dict:
    """Batch model inputs: fixed shapes are stacked; sequences padded with a mask. Pool slots
    the batch's tensors occupy are listed under ``SLOTS_KEY`` (``trainer/batch_pool.py``)."""
    batch_inputs: dict[str, dict[str, torch.Tensor]] = {}
    slots: list[tuple[int, int, int, str, str]] = []
    for modality in samples[0]["inputs"]:
        parts = [s["inputs"][modality] for s in samples]
        if "jpeg" in parts[0]:  # decoded on the device: the strips' bytes differ in length
            batch_inputs[modality] = {"jpeg": [p["jpeg"] for p in parts], "cut": torch.stack([p["cut"] for p in parts])}
            continue
        x = [p["x"] for p in parts]
        extra = {k: torch.stack([p[k] for p in parts]) for k in parts[0] if k not in ("x", "mask")}  # flow's flips
        if all(t.shape == x[0].shape for t in x) and "mask" in parts[0]:
            batch_inputs[modality] = {"x": stack(x, slots, (modality, "x")), "mask": torch.stack([p["mask"] for p in parts]),
                                      **extra}
        elif all(t.shape == x[0].shape for t in x):
            batch_inputs[modality] = {"x": stack(x, slots, (modality, "x"))}
        else:
            padded, length_mask = pad_stack(x)
            if "mask" in parts[0]:
                inner, _ = pad_stack([p["mask"] for p in parts])
                length_mask = length_mask & inner
            batch_inputs[modality] = {"x": padded, "mask": length_mask}
    batch = {
        "inputs": batch_inputs,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "clip_id": [s["clip_id"] for s in samples],
    }
    if slots:
        batch[SLOTS_KEY] = slots
    return batch


def _batched(size: int, partial: bool):
    """Collate ``size`` samples a batch; damage records ride on the next batch (training
    streams never end), or on a batch of their own at the end of an evaluation stream."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        buf: list[dict] = []
        damaged: list[dict] = []
        for sample in src:
            if "__corrupt__" in sample:
                damaged.append(sample["__corrupt__"])
                if sample["__corrupt__"].get("fatal"):
                    yield {"corrupt": damaged}
                    return
                continue
            buf.append(sample)
            if len(buf) == size:
                yield {**collate(buf), "corrupt": damaged}
                buf, damaged = [], []
        if buf and partial:
            yield {**collate(buf), "corrupt": damaged}
            damaged = []
        if damaged:
            yield {"corrupt": damaged}

    return stage
