"""The flow stage: sign and size of a known motion, slot timing, the quantisation convention."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from avbalance.errors import UserError
from pipelines.stages.flow import FlowConfig, FlowStage, dequantise, quantise

H, W, MARGIN = 96, 128, 24


def textured(margin: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture larger than a frame, so a window of it can slide."""
    noise = np.random.default_rng(seed).integers(0, 256, (H + 2 * margin, W + 2 * margin)).astype(np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 2.0)


def moving_frames(n: int, dx: int, dy: int) -> list[np.ndarray]:
    """RGB frames whose content moves by (dx, dy) pixels per frame (x right, y down)."""
    margin = max(MARGIN, (abs(dx) + abs(dy)) * n)
    base = textured(margin)
    frames = []
    for i in range(n):
        x0, y0 = margin - dx * i, margin - dy * i
        gray = base[y0:y0 + H, x0:x0 + W]
        frames.append(np.repeat(gray[..., None], 3, axis=2))
    return frames


def run(cfg: FlowConfig, frames: list[np.ndarray], fps: float) -> dict:
    stage = FlowStage(cfg)
    for i, rgb in enumerate(frames):
        stage.add(i, i / fps, rgb)
    stage.close(1 / fps)
    return stage.finish_clip()


def tiles(strip: np.ndarray, stride: int) -> list[np.ndarray]:
    image = np.asarray(Image.open(io.BytesIO(strip.tobytes())))
    assert image.ndim == 2  # grayscale JPEG
    return [image[:, i:i + W] for i in range(0, image.shape[1], stride)]


@pytest.mark.parametrize("dx, dy", [(3, -2), (-4, 1)])
def test_shifted_pattern_gives_flow_of_that_sign_and_size(dx, dy):
    out = run(FlowConfig(rate=10.0, stack=1), moving_frames(4, dx, dy), fps=10.0)
    xs, ys = tiles(out["x_strip"], int(out["stride"])), tiles(out["y_strip"], int(out["stride"]))
    step = 40.0 / 255  # one quantisation step at bound 20
    for k in range(3):  # slots 0..2 have a following frame; interior pixels only
        fx = np.median(dequantise(xs[k][16:-16, 16:-16], 20.0))
        fy = np.median(dequantise(ys[k][16:-16, 16:-16], 20.0))
        assert abs(fx - dx) <= 2 * step and abs(fy - dy) <= 2 * step, (k, fx, fy)
    # The last frame has no successor: zero flow (mid grey) and 0 real pairs.
    assert list(out["pairs"]) == [1, 1, 1, 0]
    assert abs(int(np.median(xs[3])) - 128) <= 1


def test_slots_follow_the_frames_stage_instants_and_stack_consecutive_fields():
    # 25 frames at 10 fps = 2.5 s: slots at 0, 1, 2 s (as the 1-fps frames); stack 3.
    frames = moving_frames(25, 1, 0)
    out = run(FlowConfig(rate=1.0, stack=3), frames, fps=10.0)
    assert out["times"].tolist() == [0.0, 1.0, 2.0]
    assert out["pairs"].tolist() == [3, 3, 3]
    xs = tiles(out["x_strip"], int(out["stride"]))
    assert len(xs) == 9  # slot-major: slot * stack + k


def test_quantisation_is_the_two_stream_convention():
    field = np.array([-30.0, -20.0, 0.0, 20.0, 25.0])
    q = quantise(field, 20.0)
    assert q.tolist() == [0, 0, 128, 255, 255]  # clipped to +-bound, zero -> 127.5 -> 128
    assert np.allclose(dequantise(q, 20.0), [-20, -20, 0, 20, 20], atol=40 / 255)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(UserError, match="preset"):
        FlowStage(FlowConfig(preset="tvl1"))
    with pytest.raises(UserError, match="stack"):
        FlowStage(FlowConfig(stack=0))


def test_decoded_video_gives_flow_slots_at_the_rgb_frames_instants(tmp_path):
    from pipelines.stages.decode import FrameSampler, decode_clip
    from pipelines.stages.frames import FramesConfig, FramesStage
    from pipelines.synth.encode import write_video

    path = str(tmp_path / "moving.mp4")
    write_video(path, np.stack(moving_frames(25, 2, 1)), 10, None, 16000, bit_rate=4_000_000)
    frames, flow = FramesStage(FramesConfig()), FlowStage(FlowConfig(stack=2))
    decode_clip(path, [FrameSampler(1.0, frames.add), flow])
    out = flow.finish_clip()
    assert out["times"].tolist() == frames.times == [0.0, 1.0, 2.0]  # flow slot n goes with RGB frame n
    xs, ys = tiles(out["x_strip"], int(out["stride"])), tiles(out["y_strip"], int(out["stride"]))
    assert len(xs) == 6
    for x, y in zip(xs, ys):  # through H.264 too, the motion's sign and size survive
        assert abs(np.median(dequantise(x[16:-16, 16:-16], 20.0)) - 2) < 0.5
        assert abs(np.median(dequantise(y[16:-16, 16:-16], 20.0)) - 1) < 0.5


def test_a_flipped_flow_field_points_the_other_way():
    from trainer.flow_input import flow_values, split_flow

    x = encode_gray([quantise(np.full((8, 16), 4.0), 20.0), quantise(np.full((8, 16), -2.0), 20.0)])
    y = encode_gray([quantise(np.full((8, 16), 1.0), 20.0), quantise(np.zeros((8, 16)), 20.0)])
    meta = {"flow": {"count": 1, "stack": 2, "stride": 16}, "video": {"width": 16}}
    (slot,) = split_flow(x, y, meta)
    assert slot.shape == (4, 8, 16)  # x0, y0, x1, y1
    plain, flipped = flow_values(slot), flow_values(slot, negate_x=True)
    expected = np.array([4.0, 1.0, -2.0, 0.0]) / 20.0
    assert np.allclose(plain.mean(dim=(1, 2)).numpy(), expected, atol=0.02)
    assert np.allclose(flipped.mean(dim=(1, 2)).numpy(), expected * [-1, 1, -1, 1], atol=0.02)


def encode_gray(images: list[np.ndarray]) -> bytes:
    from pipelines.stages.frames import encode_strip

    return encode_strip(images, 95)[0]


def test_the_flow_encoder_must_read_the_flow_source():
    from trainer.run_model import check_inputs

    cfg = {"data": {"modalities": {"rgb": "frames", "flow": "frames"}},
           "model": {"encoders": {"rgb": {"name": "resnet18_visual"}, "flow": {"name": "resnet18_flow"}}}}
    with pytest.raises(UserError, match="resnet18_flow reads 'flow'"):
        check_inputs(cfg)
    cfg["data"]["modalities"]["flow"] = "flow"
    check_inputs(cfg)
