"""Clip windows (AVE events, VGGSound's 10 s windows): decode honours start,end and keeps the
frames and the audio aligned. The clips go black and silent -> coloured and loud at a known
time, so the instant of the change can be found in both streams."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.stages.audio import read_wav
from pipelines.stages.decode import AUDIO_SR, FrameSampler, cut_audio, decode_clip
from pipelines.synth.encode import write_video, write_wav
from pipelines.synth.layouts import SR, clip_arrays


def onset(audio: np.ndarray) -> float:
    """Seconds from the start to the first sample above a tenth of the peak."""
    level = np.abs(audio.astype(np.float32))
    return float(np.argmax(level > 0.1 * level.max())) / AUDIO_SR


def decode(path: str, window):
    frames: list[tuple[float, np.ndarray]] = []
    clip = decode_clip(path, [FrameSampler(1.0, lambda slot, t, rgb: frames.append((t, rgb)))], want_audio=True, window=window)
    return clip, frames


@pytest.mark.parametrize("ext", [".mp4", ".webm"])
@pytest.mark.parametrize("change_at,window", [(2.0, (1.5, 3.5)), (4.5, (4.0, 5.5))])  # the second seeks (start > 2 s)
def test_a_window_keeps_frames_and_audio_aligned(tmp_path, ext, change_at, window):
    frames, audio = clip_arrays(2, 6.0, fps=10, change_at=change_at)
    path = str(tmp_path / f"clip{ext}")
    write_video(path, frames, 10, audio, SR)
    clip, got = decode(path, window)
    start, end = window
    # 1-fps slots at start + 0 s, start + 1 s: black before the change, coloured after it
    assert [round(t, 3) for t, _ in got] == [0.0, 1.0]
    assert got[0][1].mean() < 20 < 60 < got[1][1].mean()
    # the audio covers the window and its onset is where the picture changes
    assert len(clip.audio) == pytest.approx((end - start) * AUDIO_SR, abs=AUDIO_SR * 0.005)
    assert onset(clip.audio) == pytest.approx(change_at - start, abs=0.03)
    assert clip.duration == pytest.approx(end - start, abs=0.11)


def test_the_whole_file_without_a_window_is_unchanged(tmp_path):
    frames, audio = clip_arrays(1, 3.0, fps=10, change_at=1.0)
    path = str(tmp_path / "clip.mp4")
    write_video(path, frames, 10, audio, SR)
    clip, got = decode(path, None)
    assert [round(t, 3) for t, _ in got] == [0.0, 1.0, 2.0]
    assert got[0][1].mean() < 20 < 60 < got[1][1].mean()
    assert onset(clip.audio) == pytest.approx(1.0, abs=0.03)


def test_a_sidecar_wav_is_cut_to_the_same_window(tmp_path):
    _, audio = clip_arrays(0, 4.0, change_at=2.0)
    write_wav(str(tmp_path / "a.wav"), audio, SR)
    cut = cut_audio(read_wav(str(tmp_path / "a.wav")), 0.0, 1.5, 3.5)
    assert len(cut) == 2 * AUDIO_SR and onset(cut) == pytest.approx(0.5, abs=0.002)
    # a track that starts after the window's start is padded with silence in front
    padded = cut_audio(np.full(AUDIO_SR, 1000, np.int16), 0.25, 0.0, 1.0)
    assert len(padded) == AUDIO_SR and not padded[:4000].any() and padded[4000:].all()


def test_a_window_past_the_end_of_the_video_is_a_decode_error(tmp_path):
    from pipelines.stages.decode import DecodeError

    frames, audio = clip_arrays(0, 2.0)
    path = str(tmp_path / "short.mp4")
    write_video(path, frames, 10, audio, SR)
    with pytest.raises(DecodeError, match="no frame in the window"):
        decode(path, (5.0, 7.0))
