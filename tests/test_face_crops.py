"""The face stage's square crops (pipelines/stages/face_crops.py) equal torchvision's
``roi_align(aligned=True, sampling_ratio=2)``, which the stage used before: boxes inside the
frame, across its edges, wholly outside it, smaller and larger than the output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from pipelines.stages.face_crops import crop_square

BOXES = [
    (150.3, 80.2, 310.7, 240.6),  # a CREMA-D-sized face, inside
    (-40.0, -25.5, 90.0, 104.5),  # across the top-left corner
    (400.2, 300.7, 560.2, 460.7),  # across the bottom-right corner
    (-300.0, -300.0, -100.0, -100.0),  # wholly outside: zeros
    (0.3, 0.2, 479.9, 359.6),  # the whole frame: downsampling
    (200.0, 150.0, 210.5, 160.5),  # ten pixels: upsampling
    (-0.7, 100.0, 479.6, 580.3),  # taller than the frame
]


@pytest.mark.parametrize("size", [260, 224, 37])
def test_crops_equal_roi_align(size):
    frames = np.random.default_rng(size).integers(0, 256, (len(BOXES), 360, 480, 3), dtype=np.uint8)
    got = torch.stack([crop_square(f, b, size) for f, b in zip(frames, BOXES)])
    rois = torch.cat([torch.arange(len(BOXES), dtype=torch.float32)[:, None], torch.tensor(BOXES, dtype=torch.float32)], 1)
    want = roi_align(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), rois, output_size=size,
                     spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert got.shape == want.shape == (len(BOXES), 3, size, size) and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-3  # float rounding on a 0..255 scale
    assert got[3].abs().max().item() == 0.0  # nothing of the frame under a box outside it
