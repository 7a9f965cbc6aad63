"""audio: the 16 kHz mono waveform (int16) and a spectrogram at 22,050 Hz over 3 s.

The spectrogram follows the reference ResNet input (OGM-GE's CREMA-D loader): resample to
22,050 Hz, tile the clip to 3 s, clip to [-1, 1], STFT with n_fft 512 and hop 353 (188
frames). ``linear`` is exactly that input, log(|STFT| + 1e-7), 257 x 188; ``logmel`` (the
default) maps the power spectrum to 128 Mel bins first, log(mel + 1e-7), 128 x 188.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import soxr

from avbalance import shard_format as F
from pipelines.stages.base import STAGES, Stage, StageError, npy_bytes

if TYPE_CHECKING:
    from pipelines.config import PreprocessConfig
    from pipelines.worker import ClipWork

AUDIO_SR = 16000


@dataclass(frozen=True)
class AudioConfig:
    spec: str = "logmel"  # logmel | linear
    n_mels: int = 128
    spec_sr: int = 22050
    seconds: float = 3.0
    n_fft: int = 512
    hop: int = 353
    min_duration: float = 0.5  # shorter clips are flagged ``short`` (kept)
    silence_peak: float = 1e-3  # peak |amplitude| (full scale 1.0) below which a clip is flagged ``silent``

    def __post_init__(self) -> None:
        if self.spec not in ("logmel", "linear"):
            raise ValueError(f"spec must be logmel or linear, not {self.spec!r}")


class AudioError(StageError):
    """The clip's audio is unusable; the message says why."""


def resample(y: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """``librosa.resample(res_type="soxr_hq")`` without librosa's start-up cost: soxr's HQ
    filter, then the length fixed to ceil(n * sr_out / sr_in)."""
    out = soxr.resample(y, sr_in, sr_out, quality="soxr_hq")
    n = int(math.ceil(len(y) * sr_out / sr_in))
    return out[:n] if len(out) >= n else np.pad(out, (0, n - len(out)))


@functools.lru_cache(maxsize=4)
def _hann(n_fft: int) -> np.ndarray:
    """The periodic Hann window (scipy's ``get_window("hann", n, fftbins=True)``)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)


def stft_magnitude(y: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT| as ``librosa.stft(y, n_fft, hop)`` computes it (centred, zero-padded, Hann)."""
    padded = np.pad(y, n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    spec = np.fft.rfft(_hann(n_fft) * frames, axis=-1).astype(np.complex64)
    return np.abs(spec).T


@functools.lru_cache(maxsize=4)
def _mel_basis(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)


def read_wav(path: str) -> np.ndarray:
    """A WAV file as int16 mono at 16 kHz (mixing down and resampling when needed)."""
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"cannot read WAV: {err}") from None
    mono = data.mean(axis=1)
    if sr != AUDIO_SR:
        mono = resample(mono, sr, AUDIO_SR)
    return np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16)


def spectrogram(wave16k: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """float32 (bins, frames) spectrogram of an int16 16 kHz waveform."""
    y = wave16k.astype(np.float32) / 32768.0
    y = resample(y, AUDIO_SR, cfg.spec_sr)
    n = int(cfg.spec_sr * cfg.seconds)
    y = np.tile(y, max(3, math.ceil(n / max(len(y), 1))))[:n]  # the reference tiles 3 times
    y = np.clip(y, -1.0, 1.0)
    magnitude = stft_magnitude(y, cfg.n_fft, cfg.hop)
    if cfg.spec == "linear":
        return np.log(magnitude + 1e-7).astype(np.float32)
    mel = _mel_basis(cfg.spec_sr, cfg.n_fft, cfg.n_mels) @ (magnitude.astype(np.float64) ** 2)
    return np.log(mel + 1e-7).astype(np.float32)


@STAGES.register("audio")
class AudioStage(Stage):
    version = 2  # 2: short and silent clips are kept (flagged at pack), with their peak level
    inputs = ("audio_source",)
    Config = AudioConfig
    rank = 50

    @classmethod
    def warm_up(cls, cfg: PreprocessConfig) -> None:
        spectrogram(np.full(1600, 100, np.int16), cls.config_of(cfg))  # librosa's first transform: ~3 s

    @classmethod
    def begin(cls, work: ClipWork) -> None:
        if work.job.wav is None:
            work.want_audio_track(cls.name)

    @classmethod
    def compute(cls, work: ClipWork) -> dict[str, np.ndarray]:
        """The clip's WAV (cut to its window), or its video's audio track."""
        from pipelines.stages.decode import cut_audio

        job = work.job
        if job.wav is not None:
            wave = read_wav(job.wav)
            if job.window is not None:  # a sidecar WAV starts with its video
                wave = cut_audio(wave, 0.0, *job.window)
        elif work.decoded is not None and work.decoded.audio is not None:
            wave = work.decoded.audio
        else:
            raise AudioError("no audio: the clip has no WAV file and its video has no audio stream")
        return cls(cls.config_of(work.cfg)).process(wave)

    @classmethod
    def placeholder(cls, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
        """An empty waveform with the spectrogram of silence."""
        config = cls.config_of(cfg)
        return {"wav": np.zeros(0, np.int16), "spec": spectrogram(np.zeros(AUDIO_SR, np.int16), config).astype(np.float16)}

    @classmethod
    def pack(cls, out: dict[str, np.ndarray], clip: dict, pack_config) -> tuple[dict[str, bytes], dict]:
        source = clip.get("audio_source", "wav" if "wav" in clip["files"] else "video")
        return ({F.WAV: npy_bytes(out["wav"].astype(np.int16)), F.SPEC: npy_bytes(out["spec"].astype(np.float16))},
                {"audio": {"seconds": round(len(out["wav"]) / 16000, 4), "source": source}})

    def process(self, wave16k: np.ndarray) -> dict[str, np.ndarray]:
        """The waveform as it is (short ones too: loaders tile them), its spectrogram (the
        clip tiled to ``seconds``, as the reference does) and its peak level (full scale 1.0)."""
        if len(wave16k) == 0:
            raise AudioError("no audio: the audio holds no samples")
        peak = float(np.abs(wave16k.astype(np.int32)).max()) / 32768.0
        return {"wav": wave16k.astype(np.int16), "spec": spectrogram(wave16k, self.config).astype(np.float16),
                "peak": np.float32(peak)}
