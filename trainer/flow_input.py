"""Optical-flow input: the ``flow_x.jpg`` / ``flow_y.jpg`` strips of a sample as per-slot
tensors (the ``flow`` stage's layout: tile j = slot * stack + k, quantised with the
two-stream convention, zero flow = 128; docs/shards.md)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def _gray(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.uint8).copy())


def split_flow(x_jpeg: bytes, y_jpeg: bytes, meta: dict) -> list[torch.Tensor]:
    """One (2 * stack, H, W) uint8 tensor per slot, channels x0, y0, x1, y1, ... (the
    two-stream stacking order)."""
    info = meta["flow"]
    count, stack, stride = info["count"], info["stack"], info["stride"]
    width = meta.get("video", {}).get("width", stride)
    xs, ys = _gray(x_jpeg), _gray(y_jpeg)
    slots = []
    for s in range(count):
        channels = []
        for k in range(stack):
            left = (s * stack + k) * stride
            channels += [xs[:, left:left + width], ys[:, left:left + width]]
        slots.append(torch.stack(channels))
    return slots


def flow_values(fields: torch.Tensor, negate_x: bool = False) -> torch.Tensor:
    """uint8 (2k, H, W) -> float in [-1, 1] with 0 = no motion (+-1 = the stage's bound).

    ``negate_x``: the fields were flipped left-right, so horizontal motion changes sign
    (the x channels are the even ones).
    """
    values = (fields.float() - 128.0) / 127.5
    if negate_x:
        values[0::2] = -values[0::2]
    return values
