"""MTCNN's three-network cascade with the image pyramid and every candidate crop resampled at once.

facenet-pytorch's ``detect_face`` resizes the frames for each pyramid level, and each
candidate box for R-net and O-net, with its own ``interpolate(mode="area")`` call: dozens of
calls a frame on CREMA-D-like video, and a large share of the face stages' CPU time once the
networks run under ONNX Runtime (``bench/face_profile.py --baseline REF`` shows it). Here the
cascade runs the same steps, with facenet-pytorch's own box arithmetic (``generateBoundingBox``,
``rerec``, ``pad``, ``bbreg``, its NMS variants) imported rather than rewritten, and reads every
pyramid level and every stage's candidates from one summed-area table of the frames.

Area resampling ("area" interpolation, i.e. adaptive average pooling) averages, for output
cell ``i`` of ``S``, the input rows ``[floor(i*h/S), ceil((i+1)*h/S))`` and likewise the columns.
A summed-area table gives each cell's sum from four lookups. The frames are integers (uint8
video), so the table is exact in int32 and each cell's sum is the same integer the pooling
adds up in float32; only the final division may round differently (a few ulp). Boxes then
agree with facenet-pytorch's to float rounding (``tests/test_mtcnn_cascade.py``).

One behaviour differs on purpose: facenet-pytorch skips a candidate whose clipped crop is
empty (a box wholly outside the frame) but keeps its row, so the network's outputs no longer
line up with the boxes; here such a candidate is dropped before the network runs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

Net = Callable[[torch.Tensor], Sequence[torch.Tensor]]
PNET_FACTOR = 0.709  # the pyramid's scale step (facenet-pytorch's default)
NET_BATCH = 512  # candidates per R-/O-net call, as facenet-pytorch's fixed_batch_process


def summed_area(frames: np.ndarray) -> np.ndarray:
    """(B, H, W, C) uint8 frames -> (B, H+1, W+1, C) summed-area table with a zero first row and
    column: ``t[b, y, x] = frames[b, :y, :x].sum((0, 1))`` (OpenCV's ``integral``). int32 while
    the sums fit (``255*H*W < 2**31``, about 8 megapixels), float64 above; exact either way."""
    import cv2

    n, h, w, c = frames.shape
    small = 255 * h * w < 2**31
    table = np.empty((n, h + 1, w + 1, c), np.int32 if small else np.float64)
    for frame, out in zip(frames, table):  # written in place: stacking copies would cost as much again
        cv2.integral(frame, sum=out.reshape(h + 1, w + 1, c), sdepth=cv2.CV_32S if small else cv2.CV_64F)
    return table


def _edges(start: np.ndarray, length: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive pooling's bin edges: (..., size) first and one-past-last input index of each
    output cell, for crops starting at ``start`` of ``length`` pixels (arrays of one shape)."""
    i = np.arange(size, dtype=np.int64)
    start, length = np.asarray(start, np.int64)[..., None], np.asarray(length, np.int64)[..., None]
    return start + (i * length) // size, start - ((-(i + 1) * length) // size)  # floor, ceil division


def _average(total: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """(..., h, w, C) integer sums over bins of ``rows`` x ``cols`` pixels -> (..., C, h, w) means."""
    count = (rows[..., :, None] * cols[..., None, :]).astype(np.float32)
    mean = total.astype(np.float32) / count[..., None]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(mean, -1, -3)))


def resize_area(table: np.ndarray, h: int, w: int) -> torch.Tensor:
    """Every frame of ``table`` (``summed_area``) area-resampled to ``h`` x ``w``: (B, C, h, w)
    float32, equal to ``interpolate(frames, (h, w), mode="area")``. The bins are the same for
    every row and column, so whole rows, then columns, of the table are gathered."""
    ylo, yhi = _edges(0, table.shape[1] - 1, h)
    xlo, xhi = _edges(0, table.shape[2] - 1, w)
    # np.take, not fancy indexing: several times faster on these shapes.
    strips = np.take(table, yhi, axis=1) - np.take(table, ylo, axis=1)  # (B, h, W+1, C): each output row's sums
    return _average(np.take(strips, xhi, axis=2) - np.take(strips, xlo, axis=2), yhi - ylo, xhi - xlo)


def resample_boxes(table: np.ndarray, image: np.ndarray, y0: np.ndarray, y1: np.ndarray,
                   x0: np.ndarray, x1: np.ndarray, size: int) -> torch.Tensor:
    """Area-resample the crops ``frames[image[k], y0[k]:y1[k], x0[k]:x1[k]]`` to ``size`` x
    ``size``: (N, C, size, size) float32, equal to ``interpolate(crop, (size, size), mode="area")``
    per crop. ``table`` is ``summed_area(frames)``; crops non-empty and inside the frame."""
    _, rows, cols, channels = table.shape
    flat = table.reshape(-1, channels)
    ylo, yhi = _edges(y0, y1 - y0, size)
    xlo, xhi = _edges(x0, x1 - x0, size)
    base = np.asarray(image, np.int64)[:, None] * rows

    def corner(y: np.ndarray, x: np.ndarray) -> np.ndarray:  # (N, size, size, C) table entries
        return flat.take(((base + y) * cols)[:, :, None] + x[:, None, :], axis=0)

    total = corner(yhi, xhi) - corner(ylo, xhi) - corner(yhi, xlo) + corner(ylo, xlo)
    return _average(total, yhi - ylo, xhi - xlo)


def _run(net: Net, x: torch.Tensor, device: str) -> tuple[torch.Tensor, ...]:
    """``net`` on ``x`` in chunks of ``NET_BATCH`` on ``device``; outputs as float32 on the CPU."""
    outs = [tuple(o.float().cpu() for o in net(x[i:i + NET_BATCH].to(device))) for i in range(0, len(x), NET_BATCH)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


def _crops(table: np.ndarray, boxes: torch.Tensor, image: torch.Tensor, w: int, h: int,
           size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input for each candidate (clipped to the frame as facenet-pytorch's ``pad``),
    normalised as MTCNN wants, and the mask of candidates whose crop is not empty."""
    from facenet_pytorch.models.utils.detect_face import pad

    y, ey, x, ex = (np.asarray(v, np.int64) for v in pad(boxes, w, h))
    keep = (ey > y - 1) & (ex > x - 1)
    data = resample_boxes(table, image.numpy()[keep], y[keep] - 1, ey[keep], x[keep] - 1, ex[keep], size)
    return (data - 127.5) * 0.0078125, torch.from_numpy(keep)


@torch.no_grad()
def detect(frames: np.ndarray, pnet: Net, rnet: Net, onet: Net, min_face_size: int = 20,
           thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = PNET_FACTOR,
           device: str = "cpu") -> tuple[list, list]:
    """Faces in (B, H, W, 3) uint8 frames: per frame an (n, 4) float32 array of boxes
    (x0, y0, x1, y1) and an (n,) array of probabilities, or ``None`` and ``[None]`` when none
    was found (what ``facenet_pytorch.MTCNN.detect`` returns with ``select_largest=False``;
    its default reorders each frame's boxes by area). The networks run on ``device``; the
    resampling and the box arithmetic on the CPU."""
    from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg, generateBoundingBox, rerec
    from torchvision.ops import batched_nms

    frames = np.ascontiguousarray(frames, np.uint8)
    n, h, w = frames.shape[:3]
    if n == 0:
        return [], []
    table = summed_area(frames)  # the pyramid and every candidate's crop are read from it

    # Stage 1: P-net over an image pyramid whose smallest face is min_face_size pixels.
    scale, side, scales = 12.0 / min_face_size, min(h, w) * 12.0 / min_face_size, []
    while side >= 12:
        scales.append(scale)
        scale, side = scale * factor, side * factor
    if not scales:  # frames smaller than the smallest face
        return [None] * n, [[None]] * n
    boxes, image = [], []
    for s in scales:
        level = (resize_area(table, int(h * s + 1), int(w * s + 1)) - 127.5) * 0.0078125
        reg, probs = _run(pnet, level, device)
        found, where = generateBoundingBox(reg, probs[:, 1], s, thresholds[0])
        pick = batched_nms(found[:, :4], found[:, 4], where, 0.5)  # within the scale and frame
        boxes.append(found[pick])
        image.append(where[pick])
    boxes, image = torch.cat(boxes), torch.cat(image)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image, 0.7)  # within the frame
    boxes, image = boxes[pick], image[pick]
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * width, boxes[:, 1] + boxes[:, 6] * height,
                         boxes[:, 2] + boxes[:, 7] * width, boxes[:, 3] + boxes[:, 8] * height, boxes[:, 4]], 1)
    boxes = rerec(boxes)

    # Stage 2: R-net refines the candidates at 24 x 24.
    if len(boxes):
        data, keep = _crops(table, boxes, image, w, h, 24)
        boxes, image = boxes[keep], image[keep]
    if len(boxes):
        reg, probs = _run(rnet, data, device)
        ok = probs[:, 1] > thresholds[1]
        boxes = torch.cat([boxes[ok, :4], probs[ok, 1:2]], 1)
        image, reg = image[ok], reg[ok]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image, 0.7)
        boxes = rerec(bbreg(boxes[pick], reg[pick]))
        image = image[pick]
    # Stage 3: O-net at 48 x 48 gives the final boxes and probabilities.
    if len(boxes):
        data, keep = _crops(table, boxes, image, w, h, 48)
        boxes, image = boxes[keep], image[keep]
    if len(boxes):
        reg, _, probs = _run(onet, data, device)
        ok = probs[:, 1] > thresholds[2]
        boxes = bbreg(torch.cat([boxes[ok, :4], probs[ok, 1:2]], 1), reg[ok])
        image = image[ok]
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image, 0.7, "Min")
        boxes, image = boxes[pick], image[pick]

    found = boxes.numpy()
    image = image.numpy()
    out_boxes, out_probs = [], []
    for b in range(n):
        mine = found[image == b]
        if len(mine):
            out_boxes.append(mine[:, :4].copy())
            out_probs.append(mine[:, 4].copy())
        else:
            out_boxes.append(None)
            out_probs.append([None])
    return out_boxes, out_probs
