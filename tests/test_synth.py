"""The synthetic corpus: real containers that ffmpeg decodes, the right rates, a findable face,
determinism by seed, and strength knobs that really move each modality."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import wave

import av
import numpy as np
import pytest

from avbalance.errors import UserError
from avbalance.ffmpeg_bin import ffmpeg_binary
from pipelines.synth.cremad import SynthConfig, synth_cremad
from pipelines.synth.face import actor_look, render_frames
from pipelines.synth.voice import emotion_voice, synth_voice


def ffmpeg_info(path: str) -> tuple[float, str]:
    """Decode the whole file with the ffmpeg binary; return (duration s, stream lines)."""
    proc = subprocess.run([ffmpeg_binary(), "-hide_banner", "-v", "info", "-i", path, "-f", "null", "-"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    hh, mm, ss = re.search(r"Duration: (\d+):(\d+):([\d.]+)", proc.stderr).groups()
    streams = "\n".join(line for line in proc.stderr.splitlines() if "Stream #0" in line)
    return int(hh) * 3600 + int(mm) * 60 + float(ss), streams


def test_layout_matches_cremad(synth_corpus):
    videos = sorted(os.listdir(os.path.join(synth_corpus, "VideoFlash")))
    wavs = sorted(os.listdir(os.path.join(synth_corpus, "AudioWAV")))
    assert len(videos) == len(wavs) == 36
    assert [v[:-4] for v in videos] == [w[:-4] for w in wavs]
    assert "1001_DFA_ANG_XX.flv" in videos


def test_files_decode_with_ffmpeg_at_cremad_rates(synth_corpus):
    for clip in ("1001_DFA_ANG_XX", "1002_DFA_SAD_XX", "1003_DFA_HAP_XX"):
        flv = os.path.join(synth_corpus, "VideoFlash", clip + ".flv")
        wav_path = os.path.join(synth_corpus, "AudioWAV", clip + ".wav")
        duration, streams = ffmpeg_info(flv)
        assert "Video: flv1" in streams and "480x360" in streams and "30 fps" in streams
        assert "Audio: mp3" in streams
        with wave.open(wav_path) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            wav_s = w.getnframes() / 16000
        assert 1.5 < wav_s < 5.0  # CREMA-D clips run ~1.3-5 s
        assert abs(duration - wav_s) < 0.15
        with av.open(flv) as c:
            n_frames = sum(1 for _ in c.decode(video=0))
        assert abs(n_frames - wav_s * 30) <= 2


def test_mtcnn_finds_the_face_in_every_clip(synth_corpus):
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(device="cpu")
    frames = []
    # One frame per clip, the first, middle or last in turn: every clip, and every part of a clip
    # over the corpus, at a third of the cost of all three per clip.
    for i, name in enumerate(sorted(os.listdir(os.path.join(synth_corpus, "VideoFlash")))):
        with av.open(os.path.join(synth_corpus, "VideoFlash", name)) as c:
            decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        frames.append(decoded[(0, len(decoded) // 2, -1)[i % 3]])
    boxes, probs = mtcnn.detect(np.stack(frames))
    found = [b is not None and p[0] > 0.95 for b, p in zip(boxes, probs)]
    assert all(found), f"no face in {found.count(False)} of {len(found)} frames"
    widths = np.array([b[0][2] - b[0][0] for b in boxes])
    assert widths.min() > 80  # a face big enough to crop at 224 without heavy upscaling


def digest_tree(root: str) -> dict[str, str]:
    return {
        f"{d}/{n}": hashlib.sha256(open(os.path.join(root, d, n), "rb").read()).hexdigest()
        for d in ("VideoFlash", "AudioWAV")
        for n in sorted(os.listdir(os.path.join(root, d)))
    }


def test_deterministic_by_seed(tmp_path):
    a = synth_cremad(SynthConfig(out=str(tmp_path / "a"), actors=1, sentences=1, seed=3, workers=1))
    synth_cremad(SynthConfig(out=str(tmp_path / "b"), actors=1, sentences=1, seed=3, workers=2))
    synth_cremad(SynthConfig(out=str(tmp_path / "c"), actors=1, sentences=1, seed=4, workers=1))
    assert a["clips"] == 6
    da, db, dc = (digest_tree(str(tmp_path / x)) for x in "abc")
    assert da == db  # same seed: same bytes, whatever the worker count
    wavs = [k for k in da if k.endswith(".wav")]
    assert all(da[k] != dc[k] for k in wavs)  # another seed: other audio


def test_rerun_skips_finished_clips(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "a"), actors=1, sentences=1, workers=1)
    synth_cremad(cfg)
    path = tmp_path / "a" / "AudioWAV" / "1001_DFA_ANG_XX.wav"
    before = path.stat().st_mtime_ns
    synth_cremad(cfg)
    assert path.stat().st_mtime_ns == before


def face_cue_spread(strength: float) -> float:
    """How far apart the six emotions' last frames are, for one actor."""
    look = actor_look(np.random.default_rng(0))
    last = [render_frames(look, e, strength, 15, 30, np.random.default_rng(1))[-1].astype(float)
            for e in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")]
    return float(np.mean([np.abs(x - last[4]).mean() for x in last]))


def test_video_signal_knob_controls_the_face_cue():
    none, full = face_cue_spread(0.0), face_cue_spread(1.0)
    assert none < 0.01  # no cue at all: the emotions' frames are identical
    assert full > 3.0  # a visible cue


def pitch_hz(audio: np.ndarray, sr: int = 16000) -> float:
    """Autocorrelation pitch of the voiced middle of an utterance."""
    mid = audio[len(audio) // 3: len(audio) // 3 + 4096].astype(float)
    ac = np.correlate(mid, mid, "full")[len(mid) - 1:]
    lo, hi = sr // 400, sr // 60
    return sr / (lo + int(np.argmax(ac[lo:hi])))


def test_audio_signal_knob_moves_pitch_and_energy():
    def voice(emotion, strength):
        rng = np.random.default_rng(5)
        return synth_voice("Don't forget a jacket", emotion_voice(emotion, strength, 120.0, rng, jitter=0.0), rng)

    assert pitch_hz(voice("FEA", 0.0)) == pytest.approx(pitch_hz(voice("NEU", 0.0)), rel=0.05)
    assert pitch_hz(voice("FEA", 1.0)) > 1.25 * pitch_hz(voice("NEU", 1.0))
    assert np.abs(voice("ANG", 1.0)).mean() > 1.5 * np.abs(voice("SAD", 1.0)).mean()
    assert len(voice("SAD", 1.0)) > len(voice("FEA", 1.0))  # slower tempo, longer clip


def test_bad_synth_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--actors"):
        synth_cremad(SynthConfig(out=str(tmp_path), actors=0))
    with pytest.raises(UserError, match="--video-signal"):
        synth_cremad(SynthConfig(out=str(tmp_path), video_signal=-1))


def test_clarity_is_drawn_independently_per_modality():
    from pipelines.synth.cremad import FAINT, clip_clarity

    cfg = SynthConfig(out="unused", audio_clear=0.7, video_clear=0.4, seed=2)
    draws = [clip_clarity(cfg, f"{1001 + i}_DFA_ANG_XX") for i in range(3000)]
    audio = np.array([d["audio"] == 1.0 for d in draws])
    visual = np.array([d["visual"] == 1.0 for d in draws])
    assert audio.mean() == pytest.approx(0.7, abs=0.03)
    assert visual.mean() == pytest.approx(0.4, abs=0.03)
    # independent: both clear as often as the product of the shares says
    assert (audio & visual).mean() == pytest.approx(0.28, abs=0.03)
    faint = [d[m] for d in draws for m in ("audio", "visual") if d[m] < 1.0]
    assert min(faint) >= 0.0 and max(faint) < FAINT
    assert np.std(faint) > 0.03  # a spread of faint strengths, not one value


def test_clear_share_changes_the_rendered_cue(tmp_path):
    """The same clips rendered with and without the face cue (same seed: the same sway and
    noise) differ clearly when every face is clear (video_clear 1) and barely when every face
    is faint (video_clear 0)."""
    def last_frames(name: str, video_signal: float, video_clear: float) -> dict[str, np.ndarray]:
        out = tmp_path / name
        synth_cremad(SynthConfig(out=str(out), actors=1, sentences=1, workers=1, video_signal=video_signal,
                                 video_clear=video_clear))
        frames = {}
        for e in ("ANG", "HAP", "SAD"):
            with av.open(str(out / "VideoFlash" / f"1001_DFA_{e}_XX.flv")) as c:
                frames[e] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)][-1].astype(float)
        return frames

    none = last_frames("none", 0.0, 1.0)
    def cue(frames: dict[str, np.ndarray]) -> float:
        return float(np.mean([np.abs(frames[e] - none[e]).mean() for e in frames]))

    clear, faint = cue(last_frames("clear", 1.0, 1.0)), cue(last_frames("faint", 1.0, 0.0))
    assert clear > 3.0  # a visible cue
    assert faint < clear / 3  # at most a fifth of the cue, plus codec noise


def test_rerun_with_other_settings_is_refused(tmp_path):
    synth_cremad(SynthConfig(out=str(tmp_path / "a"), actors=1, sentences=1, workers=1, video_clear=0.5))
    with pytest.raises(UserError, match="other settings.*video_clear 0.5 -> 0.9"):
        synth_cremad(SynthConfig(out=str(tmp_path / "a"), actors=1, sentences=1, workers=1, video_clear=0.9))
    # more actors only add clips: allowed
    synth_cremad(SynthConfig(out=str(tmp_path / "a"), actors=2, sentences=1, workers=1, video_clear=0.5))
    assert len(os.listdir(tmp_path / "a" / "VideoFlash")) == 12


def test_bad_clear_share_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--audio-clear"):
        synth_cremad(SynthConfig(out=str(tmp_path), audio_clear=1.5))
