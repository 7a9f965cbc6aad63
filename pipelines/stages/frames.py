"""frames: 1-fps RGB frames (ffmpeg ``fps=1:round=up`` semantics), stored as one JPEG with
the frames side by side (encoded once, here; ``pack`` copies the bytes)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from avbalance import shard_format as F
from pipelines.stages.base import STAGES, Stage

if TYPE_CHECKING:
    from pipelines.config import PreprocessConfig
    from pipelines.worker import ClipWork


@dataclass(frozen=True)
class FramesConfig:
    rate: float = 1.0
    jpeg_quality: int = 90


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def strip_stride(width: int) -> int:
    """Tiles start at multiples of 16 pixels (the 4:2:0 JPEG block), so no compression
    block straddles two frames."""
    return 16 * math.ceil(width / 16)


def encode_strip(images: list[np.ndarray | None], quality: int, blank: tuple[int, int] | None = None) -> tuple[bytes, int]:
    """Images of one size (RGB, or 2-D grayscale) side by side in one JPEG (``None`` = a black
    RGB tile of size ``blank`` (h, w), which is needed only when every image is ``None``)."""
    first = next((img for img in images if img is not None), None)
    h, w = first.shape[:2] if first is not None else blank
    channels = first.shape[2:] if first is not None else (3,)
    stride = strip_stride(w)
    strip = np.zeros((h, stride * len(images), *channels), np.uint8)
    for i, img in enumerate(images):
        if img is not None:
            strip[:, i * stride:i * stride + w] = img
    return encode_jpeg(strip, quality), stride


def pack_blobs(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate byte strings into one uint8 array plus offsets (no pickled object arrays)."""
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return np.frombuffer(b"".join(blobs), np.uint8).copy(), offsets


def unpack_blobs(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    return [raw[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


@STAGES.register("frames")
class FramesStage(Stage):
    version = 2  # 2: video_info also holds the header's duration; decode_note
    inputs = ("video",)
    Config = FramesConfig
    rank = 10

    def __init__(self, config: FramesConfig) -> None:
        super().__init__(config)
        self.images: list[np.ndarray] = []
        self.times: list[float] = []

    def add(self, slot: int, t: float, rgb: np.ndarray) -> None:
        self.images.append(rgb)
        self.times.append(t)

    def finish_clip(self) -> dict[str, np.ndarray]:
        strip, stride = encode_strip(self.images, self.config.jpeg_quality)
        return {"strip": np.frombuffer(strip, np.uint8), "stride": np.int64(stride), "times": np.asarray(self.times, np.float32)}

    @classmethod
    def begin(cls, work: ClipWork) -> None:
        from pipelines.stages.decode import FrameSampler

        stage = work.state[cls.name] = cls(cls.config_of(work.cfg))
        work.samplers.append(FrameSampler(stage.config.rate, stage.add))

    @classmethod
    def compute(cls, work: ClipWork) -> dict[str, np.ndarray]:
        return {**work.state[cls.name].finish_clip(), **work.video_info}

    @classmethod
    def placeholder(cls, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
        """No frames (count 0): one 16-pixel black tile."""
        strip, stride = encode_strip([np.zeros((16, 16, 3), np.uint8)], 90)
        return {"strip": np.frombuffer(strip, np.uint8), "stride": np.int64(stride), "times": np.zeros(0, np.float32)}

    @classmethod
    def pack(cls, out: dict[str, np.ndarray], clip: dict, pack_config) -> tuple[dict[str, bytes], dict]:
        return {F.FRAMES: out["strip"].tobytes()}, {"frames": {
            "count": int(len(out["times"])), "stride": int(out["stride"]), "times": [round(float(t), 3) for t in out["times"]]}}
