"""frames: 1-fps RGB frames (ffmpeg ``fps=1:round=up`` semantics), stored as JPEG."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.stages.base import STAGES, Stage


@dataclass(frozen=True)
class FramesConfig:
    rate: float = 1.0
    jpeg_quality: int = 90


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def pack_blobs(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate byte strings into one uint8 array plus offsets (no pickled object arrays)."""
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return np.frombuffer(b"".join(blobs), np.uint8).copy(), offsets


def unpack_blobs(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    return [raw[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


@STAGES.register("frames")
class FramesStage(Stage):
    name = "frames"
    version = 1
    inputs = ("video",)

    def __init__(self, config: FramesConfig) -> None:
        super().__init__(config)
        self.jpegs: list[bytes] = []
        self.times: list[float] = []

    def start_clip(self) -> None:
        self.jpegs, self.times = [], []

    def add(self, slot: int, t: float, rgb: np.ndarray) -> None:
        self.jpegs.append(encode_jpeg(rgb, self.config.jpeg_quality))
        self.times.append(t)

    def finish_clip(self) -> dict[str, np.ndarray]:
        data, offsets = pack_blobs(self.jpegs)
        return {"jpeg": data, "offsets": offsets, "times": np.asarray(self.times, np.float32)}
