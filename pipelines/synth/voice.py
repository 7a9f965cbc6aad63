"""Synthesised speech: a harmonic voice source shaped by vowel formants, syllable by syllable.

Emotion moves pitch, tempo and energy (and the pitch contour) by an amount scaled by the
audio signal strength; clip-to-clip jitter makes the classes overlap when the strength
is low, so the audio modality can be made as easy or as hard as a study needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# (pitch factor, tempo factor, energy factor, contour slope in octaves over the utterance)
EMOTION_VOICE: dict[str, tuple[float, float, float, float]] = {
    "ANG": (1.20, 1.15, 2.20, -0.10),
    "DIS": (0.88, 0.80, 1.00, -0.35),
    "FEA": (1.45, 1.35, 0.75, 0.15),
    "HAP": (1.30, 1.05, 1.50, 0.35),
    "NEU": (1.00, 1.00, 1.00, -0.05),
    "SAD": (0.82, 0.70, 0.50, -0.25),
}
# First three formants (Hz) of a few vowels.
VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [530, 1840, 2480], [300, 870, 2240], [570, 840, 2410]], float)


@dataclass(frozen=True)
class VoiceParams:
    f0: float  # the speaker's base pitch, Hz
    pitch: float
    tempo: float
    energy: float
    slope: float  # pitch contour, octaves over the utterance


def syllable_count(text: str) -> int:
    return max(1, len(re.findall(r"[aeiouy]+", text.lower())))


def emotion_voice(emotion: str, strength: float, f0: float, rng: np.random.Generator, jitter: float = 0.08) -> VoiceParams:
    """Interpolate from neutral towards the emotion by ``strength``, plus clip-level jitter."""
    pitch, tempo, energy, slope = EMOTION_VOICE[emotion]
    j = rng.normal(0.0, jitter, size=4)
    return VoiceParams(
        f0=f0,
        pitch=(1 + strength * (pitch - 1)) * (1 + j[0]),
        tempo=(1 + strength * (tempo - 1)) * (1 + j[1]),
        energy=(1 + strength * (energy - 1)) * (1 + 2 * j[2]),
        slope=strength * slope + j[3],
    )


def synth_voice(text: str, params: VoiceParams, rng: np.random.Generator, sr: int = 16000) -> np.ndarray:
    """Render an utterance of ``text`` as float32 in [-1, 1], with 0.35 s of room noise each side."""
    n_syll = syllable_count(text)
    syll_s = 0.26 / params.tempo
    lead = int(0.35 * sr)
    voiced = int(n_syll * syll_s * sr)
    total = lead + voiced + lead
    t = np.arange(voiced) / sr
    progress = t / max(t[-1], 1e-6)
    # Pitch: base * emotion * declination/contour * a little vibrato.
    f0 = params.f0 * params.pitch * 2.0 ** (params.slope * progress) * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    syll_idx = np.minimum((t / syll_s).astype(int), n_syll - 1)
    vowel_of_syll = rng.integers(0, len(VOWELS), size=n_syll)
    formants = VOWELS[vowel_of_syll[syll_idx]]  # (voiced, 3)
    source = np.zeros(voiced)
    for h in range(1, int(4000 / (params.f0 * params.pitch * 0.8)) + 1):
        freq = h * f0
        gain = sum(np.exp(-0.5 * ((freq - formants[:, i]) / (80 + 40 * i)) ** 2) / (i + 1) for i in range(3))
        source += (0.15 + gain) / h * np.sin(h * phase)
    # Syllable envelope: rise and fall inside each syllable, short gaps between them.
    within = (t / syll_s) % 1.0
    envelope = np.clip(np.sin(np.pi * within) * 1.4, 0, 1) ** 1.5
    speech = source * envelope
    speech /= max(np.abs(speech).max(), 1e-6)
    out = rng.normal(0.0, 0.003, size=total)  # room noise
    out[lead:lead + voiced] += 0.25 * params.energy * speech
    return np.clip(out, -1.0, 1.0).astype(np.float32)
