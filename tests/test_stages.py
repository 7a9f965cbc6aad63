"""Stage units against real references: ffmpeg's fps filter, the reference spectrogram,
MTCNN masks and box carrying, EfficientNet weights loading."""

from __future__ import annotations

import os
import subprocess

import librosa
import numpy as np
import pytest
import torch

from avbalance.errors import UserError
from avbalance.ffmpeg_bin import ffmpeg_binary
from pipelines.stages.audio import AudioConfig, AudioError, AudioStage, read_wav, spectrogram
from pipelines.stages.decode import FrameSampler, decode_clip
from pipelines.stages.face_features import FaceFeaturesConfig, FaceFeaturesStage, weights_identity
from pipelines.stages.faces import FaceBatcher, FacesConfig
from pipelines.synth.encode import write_flv
from pipelines.synth.face import actor_look, render_frames


def indexed_video(path: str, n: int, fps: int) -> None:
    """Frame i has brightness 2*i, so a decoded frame tells its index."""
    frames = np.zeros((n, 64, 64, 3), np.uint8)
    for i in range(n):
        frames[i] = 2 * i
    write_flv(path, frames, fps, None, 16000, bit_rate=2_000_000)


def ffmpeg_indices(path: str, vf: str) -> list[int]:
    raw = subprocess.run([ffmpeg_binary(), "-v", "error", "-i", path, "-vf", vf, "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                         capture_output=True, check=True).stdout
    return [int(round(f.mean() / 2)) for f in np.frombuffer(raw, np.uint8).reshape(-1, 64, 64)]


@pytest.mark.parametrize("n, fps", [(75, 30), (62, 25), (90, 30), (20, 10)])
def test_one_fps_frames_match_ffmpeg_fps_filter_round_up(tmp_path, n, fps):
    path = str(tmp_path / "idx.flv")
    indexed_video(path, n, fps)
    got = []
    decode_clip(path, [FrameSampler(1.0, lambda slot, t, rgb: got.append(int(round(rgb.mean() / 2))))])
    assert got == ffmpeg_indices(path, "fps=1:round=up")
    whole = n // fps
    assert got[:whole] == [k * fps for k in range(whole)]  # the first frame of each second


def test_two_and_a_half_seconds_give_three_frames(tmp_path):
    path = str(tmp_path / "idx.flv")
    indexed_video(path, 75, 30)
    slots = []
    decode_clip(path, [FrameSampler(1.0, lambda slot, t, rgb: slots.append((slot, t)))])
    assert slots == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_linear_spectrogram_equals_reference_resnet_input(synth_corpus):
    wav = os.path.join(synth_corpus, "AudioWAV", "1001_DFA_ANG_XX.wav")
    ours = spectrogram(read_wav(wav), AudioConfig(spec="linear"))
    # The reference ResNet input: librosa.load at 22,050 Hz, tile, clip, |STFT| log.
    y, _ = librosa.load(wav, sr=22050)
    y = np.clip(np.tile(y, 3)[: 22050 * 3], -1, 1)
    ref = np.log(np.abs(librosa.stft(y, n_fft=512, hop_length=353)) + 1e-7)
    assert ours.shape == ref.shape == (257, 188)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_logmel_shape_and_short_clip_tiling():
    rng = np.random.default_rng(0)
    wave = (rng.normal(0, 3000, 12000)).astype(np.int16)  # 0.75 s
    spec = spectrogram(wave, AudioConfig())
    assert spec.shape == (128, 188) and np.isfinite(spec).all()
    # tiled, not zero-padded: every one of the 188 frames carries the signal
    floor = np.log(1e-7)
    assert spec.max(axis=0).min() > floor + 5


@pytest.mark.parametrize("wave, peak, seconds", [
    (np.zeros(32000, np.int16), 0.0, 2.0),  # silent: kept, flagged at pack
    (np.full(4000, 1000, np.int16), 1000 / 32768, 0.25),  # short: stored as it is
])
def test_audio_keeps_silent_and_short_clips_with_their_peak(wave, peak, seconds):
    out = AudioStage(AudioConfig()).process(wave)
    assert len(out["wav"]) / 16000 == seconds and (out["wav"] == wave).all()
    assert float(out["peak"]) == pytest.approx(peak) and out["spec"].shape == (128, 188)


def test_audio_refuses_an_empty_waveform():
    with pytest.raises(AudioError, match="no audio"):
        AudioStage(AudioConfig()).process(np.zeros(0, np.int16))


@pytest.fixture(scope="module")
def featurizer():
    return FaceFeaturesStage(FaceFeaturesConfig(allow_random=True))


def face_clip(n: int, blank: slice | None = None) -> np.ndarray:
    frames = render_frames(actor_look(np.random.default_rng(1)), "HAP", 0.6, n, 30, np.random.default_rng(2))
    if blank is not None:
        frames[blank] = 128  # a grey screen: no face
    return frames


def run_batcher(cfg: FacesConfig, frames: np.ndarray, featurizer, batch_size: int = 8):
    batcher = FaceBatcher(cfg, featurizer, batch_size=batch_size)
    batcher.start_clip("c")
    for i, rgb in enumerate(frames):
        batcher.push("c", i, i / 30, rgb)
    batcher.flush()
    return batcher.finish_clip("c")


def test_frames_without_a_face_are_masked_not_dropped(featurizer):
    faces, feats = run_batcher(FacesConfig(size=224), face_clip(20, blank=slice(6, 11)), featurizer)
    assert faces["mask"].tolist() == [1] * 6 + [0] * 5 + [1] * 9
    assert feats["feats"].shape == (20, 1408) and feats["feats"].dtype == np.float16
    assert not feats["feats"][6:11].any()  # zero features where no face
    assert np.abs(feats["feats"][[0, 11]]).sum(axis=1).min() > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = np.maximum(a[:2], b[:2])
    x1, y1 = np.minimum(a[2:], b[2:])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_box_carrying_detects_less_and_agrees_with_per_frame_detection():
    frames = face_clip(30)
    every, _ = run_batcher(FacesConfig(), frames, None)
    carried, _ = run_batcher(FacesConfig(detect_fps=5), frames, None)
    assert every["detected"].sum() == 30
    assert carried["detected"].tolist() == [1, 0, 0, 0, 0, 0] * 5  # 5 detections per second
    assert min(iou(a, b) for a, b in zip(every["boxes"], carried["boxes"])) > 0.8


def test_downscaled_detection_gives_full_size_boxes():
    frames = face_clip(6)
    full, _ = run_batcher(FacesConfig(), frames, None)
    half, _ = run_batcher(FacesConfig(detect_scale=0.5), frames, None)
    assert half["mask"].all()
    assert min(iou(a, b) for a, b in zip(full["boxes"], half["boxes"])) > 0.8  # not half-size boxes


def test_detect_scale_keys_only_when_set():
    """Faces cached before --face-detect-scale existed stay valid at its default."""
    import dataclasses

    from pipelines.stages.base import stable_hash
    from pipelines.stages.faces import FacesStage

    keys = {"video": "v"}
    before = {k: v for k, v in dataclasses.asdict(FacesConfig()).items() if k != "detect_scale"}
    assert FacesStage(FacesConfig()).key(keys) == stable_hash("faces", FacesStage.version, before, ["v"])
    assert FacesStage(FacesConfig(detect_scale=0.5)).key(keys) != FacesStage(FacesConfig()).key(keys)


def test_crops_are_kept_when_asked(featurizer):
    faces, _ = run_batcher(FacesConfig(size=224, keep_crops=True), face_clip(4, blank=slice(1, 2)), None)
    offsets = faces["crops_offsets"]
    assert len(offsets) == 1 + 3  # one JPEG per frame with a face
    assert bytes(faces["crops_jpeg"][offsets[0]:offsets[1]][:2]) == b"\xff\xd8"


def test_weights_are_required_unless_random_is_allowed(tmp_path):
    with pytest.raises(UserError, match="--face-weights"):
        weights_identity(None, allow_random=False)
    assert weights_identity(None, allow_random=True) == "random-init-seed0"
    with pytest.raises(UserError, match="does not exist"):
        weights_identity(str(tmp_path / "nope.pth"), allow_random=False)


def test_local_weights_load_from_pth_and_safetensors(tmp_path, featurizer):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model("efficientnet_b2", num_classes=7)  # a classifier head is ignored
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    crops = torch.rand(2, 3, 224, 224) * 255
    outs = []
    for name in ("w.pth", "w.safetensors"):
        path = str(tmp_path / name)
        torch.save({"state_dict": state}, path) if name.endswith(".pth") else save_file(state, path)
        sha = weights_identity(path, allow_random=False)
        assert len(sha) == 64
        stage = FaceFeaturesStage(FaceFeaturesConfig(weights=path, weights_sha256=sha))
        outs.append(stage.features(crops))
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0].float(), featurizer.features(crops).float())  # not the random init


def test_weights_of_another_architecture_are_refused(tmp_path):
    import timm

    path = str(tmp_path / "b0.pth")
    torch.save(timm.create_model("efficientnet_b0").state_dict(), path)
    with pytest.raises(UserError, match="does not fit"):
        FaceFeaturesStage(FaceFeaturesConfig(weights=path))


def test_face_strip_of_a_faceless_clip_is_black_tiles():
    """A clip kept without any face (flag no_face) still gets a faces.jpg with --keep-face-crops."""
    import io

    from PIL import Image

    from pipelines.stages.pack import jpeg_strip

    data, stride = jpeg_strip([None, None, None], 90, size=32)
    img = np.asarray(Image.open(io.BytesIO(data)))
    assert stride == 32 and img.shape == (32, 96, 3) and img.max() <= 8
