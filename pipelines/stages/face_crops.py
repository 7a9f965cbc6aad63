"""Square face crops as ``torchvision.ops.roi_align`` makes them, computed separably.

The face stage crops each box to ``size`` x ``size`` with ``roi_align(aligned=True,
sampling_ratio=2)``: every output pixel averages 2 x 2 bilinear samples. Along a box's rows the
sample positions and their weights do not depend on the column, and the other way round, so
each output row is a weighted sum of 4 input rows (2 samples x 2 bilinear taps) and each
output column then one of 4 columns (done as a product with the columns' weight matrix, which
BLAS does faster than the gather). That touches only the box's pixels, instead of roi_align
on the whole frame turned into floats. Positions are computed in float32 in roi_align's order
of operations and its rules hold (a sample more than a pixel outside the frame weighs nothing,
one in the outer half pixel clamps to the edge), so the crops equal roi_align's up to float
rounding (``tests/test_face_crops.py``).
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLES = 2  # roi_align's sampling_ratio: samples per output pixel along each axis


def axis_taps(start: float, end: float, size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights, each (size, 2 * SAMPLES), of the ``size`` outputs along one
    axis of a box ``[start, end)`` (pixel coordinates) on an axis of ``length`` pixels."""
    f32 = np.float32
    begin = f32(start) - f32(0.5)  # aligned=True: pixel centres at integer + 0.5
    step = (f32(end) - f32(0.5) - begin) / f32(size)
    pos = (begin + np.arange(size, dtype=f32)[:, None] * step) + (np.arange(SAMPLES, dtype=f32)[None, :] + f32(0.5)) * step / f32(SAMPLES)
    inside = (pos >= -1.0) & (pos <= length)  # farther out a sample is zero
    pos = np.maximum(pos, f32(0.0))
    low = pos.astype(np.int64)  # pos >= 0: truncation is floor
    at_edge = low >= length - 1
    low = np.where(at_edge, length - 1, low)
    high = np.where(at_edge, length - 1, low + 1)
    frac = np.where(at_edge, f32(0.0), pos - low.astype(f32))
    weight = np.where(inside, f32(1.0 / SAMPLES), f32(0.0))
    return (np.concatenate([low, high], axis=1),
            np.concatenate([weight * (f32(1.0) - frac), weight * frac], axis=1).astype(f32))


def crop_square(frame: np.ndarray, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """(3, size, size) float32 crop of an (H, W, 3) uint8 frame over ``box`` (x0, y0, x1, y1),
    equal to ``roi_align(frame, [box], size, spatial_scale=1, sampling_ratio=2, aligned=True)``."""
    h, w = frame.shape[:2]
    y_index, y_weight = axis_taps(box[1], box[3], size, h)
    x_index, x_weight = axis_taps(box[0], box[2], size, w)
    left = int(x_index.min())
    columns = frame[:, left:int(x_index.max()) + 1]  # the box's columns only
    rows = np.einsum("yk,ykxc->yxc", y_weight, columns[y_index].astype(np.float32))  # (size, n_x, 3)
    x_matrix = np.zeros((size, columns.shape[1]), np.float32)
    np.add.at(x_matrix, (np.repeat(np.arange(size), x_index.shape[1]), (x_index - left).ravel()), x_weight.ravel())
    return torch.from_numpy(np.ascontiguousarray(rows.transpose(2, 0, 1)) @ x_matrix.T)  # (3, size, size)
