"""Stages that exist only in tests: defined here, registered by the test that uses them
(``registered``) and removed after it. The module registers nothing when imported, so other
tests never see them; a Ray worker imports it to unpickle the classes the engine sends, and
registers them there (``pipelines.stages.base.adopt``). Nothing outside this file names them."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipelines.stages.base import STAGES, Stage, StageError


@dataclass(frozen=True)
class LoudnessConfig:
    window_s: float = 0.25


class LoudnessStage(Stage):
    """The RMS level of the clip's 16 kHz waveform per window: reads the audio stage's output."""

    version = 1
    inputs = ("audio",)
    Config = LoudnessConfig

    @classmethod
    def compute(cls, work) -> dict[str, np.ndarray]:
        return {"rms": loudness(work.input("audio")["wav"], cls.config_of(work.cfg).window_s)}

    @classmethod
    def placeholder(cls, cfg) -> dict[str, np.ndarray]:
        return {"rms": np.zeros(0, np.float32)}


def loudness(wav: np.ndarray, window_s: float) -> np.ndarray:
    if len(wav) == 0:
        raise StageError("no samples")
    step = max(1, int(window_s * 16000))
    x = wav.astype(np.float32) / 32768.0
    return np.asarray([np.sqrt(np.mean(x[i:i + step] ** 2)) for i in range(0, len(x), step)], np.float32)


class FaceCountStage(Stage):
    """How many face frames found a face: reads the faces stage, whose output comes at the end
    of a chunk (batched), so this one waits for it."""

    version = 1
    inputs = ("faces",)

    @classmethod
    def compute(cls, work) -> dict[str, np.ndarray]:
        return {"found": np.int64(work.input("faces")["mask"].sum())}

    @classmethod
    def placeholder(cls, cfg) -> dict[str, np.ndarray]:
        return {"found": np.int64(0)}


@contextmanager
def registered(**stages: type[Stage]) -> Iterator[None]:
    """The stages registered by name (as ``@STAGES.register(name)`` does) for the block only."""
    try:
        for name, cls in stages.items():
            STAGES.register(name)(cls)
        yield
    finally:
        for name in stages:
            STAGES._items.pop(name, None)
