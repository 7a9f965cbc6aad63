"""flow: dense optical flow between consecutive video frames, stored as quantised x/y JPEGs.

Slot n (at n / ``rate`` seconds, the same instants as the ``frames`` stage, so flow slot n
goes with RGB frame n) starts at the frame on screen at that instant (ffmpeg's
``fps=R:round=up``); the slot holds ``stack`` flow fields between that frame and the next
ones, frame i -> i+1, i+1 -> i+2, ... (the two-stream input of Simonyan & Zisserman 2014 is
a stack of L=10; the balancing benchmarks feed one field per sampled instant). Near the end
of the clip a slot may run out of following frames: its missing fields are zero flow and
``pairs`` says how many are real.

The method is OpenCV's DIS (Kroeger et al. 2016), which ships in the main module; TV-L1
(the two-stream references' method) lives in opencv-contrib's ``optflow`` only, which the
project does not install. Each field is clipped to +-``bound`` pixels and mapped linearly to
0..255 (the two-stream convention: ``round((f + bound) * 255 / (2 * bound))``, zero flow =
128), x and y as two grayscale JPEG strips with the fields side by side (tile j =
slot * stack + k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np

from avbalance import shard_format as F
from avbalance.errors import UserError
from pipelines.stages.base import STAGES, Stage
from pipelines.stages.frames import encode_strip

if TYPE_CHECKING:
    import av

    from pipelines.config import PreprocessConfig
    from pipelines.worker import ClipWork

PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
EPS = 1e-3  # frame timestamps are rounded to milliseconds (as in decode.py)


@dataclass(frozen=True)
class FlowConfig:
    rate: float = 1.0  # flow slots per second (1: one per 1-fps RGB frame)
    stack: int = 1  # consecutive flow fields per slot (two-stream: 10)
    bound: float = 20.0  # pixels; larger displacements are clipped
    preset: str = "medium"  # DIS preset: ultrafast, fast, medium
    jpeg_quality: int = 90

    def check(self) -> None:
        """Refuse settings the stage cannot honour, naming the option."""
        if self.preset not in PRESETS:
            raise UserError(f"flow preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if not self.rate > 0 or self.stack < 1 or not self.bound > 0:
            raise UserError(f"flow needs rate > 0, stack >= 1 and bound > 0 (got {self.rate}, {self.stack}, {self.bound})")


def quantise(field: np.ndarray, bound: float) -> np.ndarray:
    """Flow in pixels -> uint8: clip to +-bound, map -bound..bound to 0..255."""
    scaled = (np.clip(field, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return np.round(scaled).astype(np.uint8)


def dequantise(image: np.ndarray, bound: float) -> np.ndarray:
    """uint8 -> flow in pixels (the inverse of ``quantise`` up to one step, 2*bound/255)."""
    return image.astype(np.float32) * (2.0 * bound / 255.0) - bound


def flow_layout(config: FlowConfig) -> dict[str, np.ndarray]:
    """What a reader needs besides the strips: fields per slot and the quantisation bound."""
    return {"stack": np.int64(config.stack), "bound": np.float64(config.bound)}


class _Slot:
    """A slot whose fields are still being computed."""

    def __init__(self, t: float, start: np.ndarray) -> None:
        self.t = t
        self.last = start
        self.fields: list[np.ndarray] = []


@STAGES.register("flow")
class FlowStage(Stage):
    """A decode sampler (``push`` every frame, ``close`` at the end, as ``FrameSampler``);
    ``finish_clip`` returns the strips. Only the frames a slot needs are converted to
    grayscale: at 1 slot a second that is 2 frames in 25."""

    version = 1
    inputs = ("video",)
    Config = FlowConfig
    rank = 20

    @classmethod
    def cache_key(cls, config: FlowConfig, input_keys: dict[str, str]) -> str:
        config.check()  # every clip's keys are made before any work: a bad setting stops the run there
        return super().cache_key(config, input_keys)

    @classmethod
    def begin(cls, work: ClipWork) -> None:
        stage = work.state[cls.name] = cls(cls.config_of(work.cfg))
        work.samplers.append(stage)  # sees every frame: flow is between consecutive ones

    @classmethod
    def compute(cls, work: ClipWork) -> dict[str, np.ndarray]:
        return {**work.state[cls.name].finish_clip(), **work.video_info}

    @classmethod
    def placeholder(cls, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
        """No flow (count 0): one 16-pixel tile of zero flow."""
        strip, stride = encode_strip([np.zeros((16, 16), np.uint8)], 90)
        return {"x_strip": np.frombuffer(strip, np.uint8), "y_strip": np.frombuffer(strip, np.uint8), "stride": np.int64(stride),
                "times": np.zeros(0, np.float32), "pairs": np.zeros(0, np.int64), **flow_layout(cls.config_of(cfg))}

    @classmethod
    def pack(cls, out: dict[str, np.ndarray], clip: dict, pack_config) -> tuple[dict[str, bytes], dict]:
        return {F.FLOW_X: out["x_strip"].tobytes(), F.FLOW_Y: out["y_strip"].tobytes()}, {"flow": {
            "count": int(len(out["times"])), "stack": int(out["stack"]), "stride": int(out["stride"]),
            "bound": float(out["bound"]), "times": [round(float(t), 3) for t in out["times"]],
            "pairs": [int(p) for p in out["pairs"]]}}

    def __init__(self, config: FlowConfig) -> None:
        super().__init__(config)
        config.check()
        self.dis = cv2.DISOpticalFlow_create(PRESETS[config.preset])
        self.next_slot = 0
        self.prev: tuple[float, Callable[[], np.ndarray]] | None = None
        self.open: list[_Slot] = []
        self.done: list[_Slot] = []
        self.size: tuple[int, int] | None = None

    def push(self, t: float, frame: av.VideoFrame) -> None:
        """The next decoded frame (seconds from the first frame, the PyAV frame)."""
        self.size = (frame.height, frame.width)
        self._feed(t, lambda: frame.to_ndarray(format="gray"))

    def add(self, index: int, t: float, rgb: np.ndarray) -> None:
        """The next frame as an RGB array (the ``FrameSampler`` sink signature)."""
        self.size = rgb.shape[:2]
        self._feed(t, lambda: cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))

    def close(self, frame_duration: float, limit: float | None = None) -> None:
        """The clip ended; its last frame lasts ``frame_duration`` s, cut at ``limit`` (a
        window's length) when given: the slots are the ``frames`` stage's (``FrameSampler.close``)."""
        if self.prev is not None:
            end = self.prev[0] + frame_duration
            self._open_slots(self.prev, until=(end if limit is None else min(end, limit)) - 1e-9)
            self.prev = None

    def _feed(self, t: float, to_gray: Callable[[], np.ndarray]) -> None:
        gray = _once(to_gray)
        if self.prev is not None:
            self._open_slots(self.prev, until=t - EPS)
        for slot in self.open:
            slot.fields.append(self.dis.calc(slot.last, gray(), None))
            slot.last = gray()
        self.done += [s for s in self.open if len(s.fields) == self.config.stack]
        self.open = [s for s in self.open if len(s.fields) < self.config.stack]
        self.prev = (t, gray)

    def _open_slots(self, frame: tuple[float, Callable[[], np.ndarray]], until: float) -> None:
        """Start every slot whose instant falls while ``frame`` is on screen (before ``until``)."""
        t_frame, gray = frame
        while self.next_slot / self.config.rate < until:
            slot_t = self.next_slot / self.config.rate
            if slot_t >= t_frame - EPS:
                self.open.append(_Slot(slot_t, gray()))
            self.next_slot += 1

    def finish_clip(self) -> dict[str, np.ndarray]:
        """The strips of the closed clip (call ``close`` first)."""
        slots = sorted(self.done + self.open, key=lambda s: s.t)
        h, w = self.size or (16, 16)
        zero = np.zeros((h, w, 2), np.float32)
        tiles = [s.fields[k] if k < len(s.fields) else zero for s in slots for k in range(self.config.stack)]
        strip_x, stride = encode_strip([quantise(f[..., 0], self.config.bound) for f in tiles], self.config.jpeg_quality)
        strip_y, _ = encode_strip([quantise(f[..., 1], self.config.bound) for f in tiles], self.config.jpeg_quality)
        return {
            "x_strip": np.frombuffer(strip_x, np.uint8), "y_strip": np.frombuffer(strip_y, np.uint8),
            "stride": np.int64(stride), "times": np.asarray([s.t for s in slots], np.float32),
            "pairs": np.asarray([len(s.fields) for s in slots], np.int64), **flow_layout(self.config),
        }


def _once(make: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """``make`` called at most once, on first use."""
    cache: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not cache:
            cache.append(make())
        return cache[0]

    return get
