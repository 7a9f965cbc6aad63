"""The face stage's MTCNN cascade (pipelines/stages/mtcnn_cascade.py) against facenet-pytorch:
its vectorised area resampling equals ``interpolate(mode="area")`` crop by crop, and its boxes
equal ``MTCNN.detect``'s on real frames (the synthetic corpus's photo face)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.functional import interpolate

from pipelines.stages import mtcnn_cascade as cascade
from pipelines.synth.face import actor_look, render_frames


def frames_of(seed: int, n: int = 3, h: int = 90, w: int = 130) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_summed_area_table_is_exact():
    frames = frames_of(0)
    table = cascade.summed_area(frames)
    expected = np.zeros((3, 91, 131, 3), np.int64)
    expected[:, 1:, 1:] = frames.astype(np.int64).cumsum(1).cumsum(2)
    assert table.dtype == np.int32 and table.shape == expected.shape
    assert np.array_equal(table, expected)


@pytest.mark.parametrize("size", [(45, 65), (29, 41), (12, 17), (90, 130), (100, 150)])
def test_pyramid_level_equals_area_interpolation(size):
    frames = frames_of(1)
    got = cascade.resize_area(cascade.summed_area(frames), *size)
    want = interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size, mode="area")
    assert got.shape == want.shape and got.is_contiguous()
    assert (got - want).abs().max().item() < 1e-4  # the same integer sums; division rounding at most


@pytest.mark.parametrize("size", [24, 48])
def test_every_candidate_crop_equals_its_own_area_interpolation(size):
    frames = frames_of(2)
    rng = np.random.default_rng(size)
    n = 60
    image = rng.integers(0, 3, n)
    y0, x0 = rng.integers(0, 89, n), rng.integers(0, 129, n)
    y1 = np.minimum(y0 + rng.integers(1, 90, n), 90)
    x1 = np.minimum(x0 + rng.integers(1, 130, n), 130)
    # Edge cases: a 1-pixel crop, a whole frame, crops smaller and larger than the output.
    image[:3], y0[:3], y1[:3], x0[:3], x1[:3] = [0, 1, 2], [5, 0, 10], [6, 90, 30], [7, 0, 100], [8, 130, 130]
    got = cascade.resample_boxes(cascade.summed_area(frames), image, y0, y1, x0, x1, size)
    imgs = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    want = torch.cat([interpolate(imgs[i:i + 1, :, a:b, c:d], (size, size), mode="area")
                      for i, a, b, c, d in zip(image, y0, y1, x0, x1)])
    assert got.shape == (n, 3, size, size)
    assert (got - want).abs().max().item() < 1e-4


def photo_frames(n: int, seed: int) -> np.ndarray:
    """Frames of the real photo face as ``cli.py synth`` renders them (480 x 360 video)."""
    return render_frames(actor_look(np.random.default_rng(seed)), "ANG", 0.7, n, 30, np.random.default_rng(seed + 1))


@pytest.fixture(scope="module")
def mtcnn():
    from facenet_pytorch import MTCNN

    torch.manual_seed(0)
    return MTCNN(keep_all=True, min_face_size=40, device="cpu")


def run(mtcnn, frames: np.ndarray) -> tuple[list, list]:
    return cascade.detect(frames, mtcnn.pnet, mtcnn.rnet, mtcnn.onet, mtcnn.min_face_size, mtcnn.thresholds, mtcnn.factor)


def test_boxes_equal_facenet_pytorch_on_real_frames(mtcnn):
    frames = np.concatenate([photo_frames(4, 3), photo_frames(4, 11)])
    want_boxes, want_probs = mtcnn.detect(frames)
    got_boxes, got_probs = run(mtcnn, frames)
    assert len(got_boxes) == len(frames)
    for want, got, p_want, p_got in zip(want_boxes, got_boxes, want_probs, got_probs):
        assert want is not None and got is not None  # the photo face is found in every frame
        assert got.dtype == np.float32 and got.shape == want.shape  # the same faces, in the same order
        assert np.abs(got - want).max() < 0.01  # pixels: float rounding, not a different computation
        assert np.abs(np.asarray(p_got) - np.asarray(p_want, np.float32)).max() < 1e-5


def test_frames_without_a_face_and_frames_too_small(mtcnn):
    flat = np.full((2, 120, 160, 3), 128, np.uint8)
    boxes, probs = run(mtcnn, flat)
    assert boxes == [None, None] and probs == [[None], [None]]
    assert list(mtcnn.detect(flat)[0]) == [None, None]  # as facenet-pytorch says
    tiny = frames_of(4, n=2, h=20, w=30)  # smaller than min_face_size: no pyramid level at all
    assert run(mtcnn, tiny) == ([None, None], [[None], [None]])
    assert run(mtcnn, np.zeros((0, 120, 160, 3), np.uint8)) == ([], [])


def test_a_candidate_outside_the_frame_is_dropped_not_misaligned():
    frames = frames_of(5, n=1, h=60, w=80)
    table = cascade.summed_area(frames)
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0, 0.9], [100.0, 10.0, 130.0, 40.0, 0.8]])  # the second starts right of x=80
    data, keep = cascade._crops(table, boxes, torch.zeros(2, dtype=torch.int64), 80, 60, 24)
    assert keep.tolist() == [True, False]
    assert data.shape == (1, 3, 24, 24)
    crop = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[:, :, 9:40, 9:40]  # facenet-pytorch's pad: 1-based
    assert (data - (interpolate(crop, (24, 24), mode="area") - 127.5) * 0.0078125).abs().max().item() < 1e-5
