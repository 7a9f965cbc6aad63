"""One in-process decode per clip (PyAV): every stage gets the frames it asked for, and the
audio track when the clip has no WAV, from a single demux pass.

Frame selection follows ffmpeg's ``fps=R:round=up`` filter: output slot n (at n/R seconds
from the first frame) gets the frame on screen at that instant, i.e. the last frame whose
timestamp is <= n/R. For constant-rate video this is the first frame of each 1/R-second
step (frames 0, 30, 60 of a 30 fps clip at R=1); a 2.5 s clip gives 3 frames at R=1. A frame
that spans several slots (very low frame rate) fills each of them, as ffmpeg does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import av
import numpy as np

AUDIO_SR = 16000
EPS = 1e-3  # container timestamps are in milliseconds for FLV

FrameSink = Callable[[int, float, np.ndarray], None]  # (slot index, slot time s, RGB frame)


class FrameSampler:
    """Streams frames in and emits (slot, time, frame) at a fixed rate; ``rate=None`` = every frame."""

    def __init__(self, rate: float | None, sink: FrameSink) -> None:
        self.rate = rate
        self.sink = sink
        self.next_slot = 0
        self._prev: tuple[float, av.VideoFrame] | None = None

    def push(self, t: float, frame: av.VideoFrame) -> None:
        if self.rate is None:
            self.sink(self.next_slot, t, frame.to_ndarray(format="rgb24"))
            self.next_slot += 1
            return
        if self._prev is not None:
            self._emit_until(t, margin=EPS)
        self._prev = (t, frame)

    def close(self, frame_duration: float) -> None:
        """Flush the last frame, which covers [t_last, t_last + frame_duration)."""
        if self.rate is not None and self._prev is not None:
            self._emit_until(self._prev[0] + frame_duration, margin=1e-9)
            self._prev = None

    def _emit_until(self, end: float, margin: float) -> None:
        """Emit the held frame for every slot before ``end`` (timestamps are rounded to
        milliseconds, so a slot within ``margin`` of the next frame belongs to that frame)."""
        t_prev, frame = self._prev
        rgb = None
        while self.next_slot / self.rate < end - margin:
            slot_t = self.next_slot / self.rate
            if slot_t >= t_prev - EPS:
                rgb = frame.to_ndarray(format="rgb24") if rgb is None else rgb
                self.sink(self.next_slot, slot_t, rgb)
            self.next_slot += 1


@dataclass
class DecodedClip:
    fps: float
    width: int
    height: int
    n_frames: int
    duration: float
    has_audio_stream: bool
    audio: np.ndarray | None = None  # int16 mono at 16 kHz, when requested
    notes: list[str] = field(default_factory=list)
    stated_duration: float | None = None  # what the container header says, when it says


class DecodeError(Exception):
    """The clip cannot be decoded; the message says why."""


def decode_clip(path: str, samplers: list[FrameSampler], want_audio: bool = False) -> DecodedClip:
    """Decode the video stream once, feeding every sampler; optionally decode the audio track."""
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as err:
        raise DecodeError(f"cannot open video: {err}") from None
    with container:
        if not container.streams.video:
            raise DecodeError("the file has no video stream")
        vstream = container.streams.video[0]
        # A file cut short decodes without an error; its header still states the full length.
        stated = container.duration / av.time_base if container.duration is not None else None
        astream = container.streams.audio[0] if container.streams.audio else None
        streams = [vstream] + ([astream] if want_audio and astream is not None else [])
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_SR) if len(streams) > 1 else None
        audio_chunks: list[np.ndarray] = []
        t0: float | None = None
        last_t = 0.0
        last_delta = 0.0
        n = 0
        size = (vstream.codec_context.width, vstream.codec_context.height)
        try:
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if isinstance(frame, av.AudioFrame):
                        for out in resampler.resample(frame):
                            audio_chunks.append(out.to_ndarray().reshape(-1))
                        continue
                    t = float(frame.time) if frame.time is not None else n / float(vstream.average_rate or 30)
                    if t0 is None:
                        t0 = t
                    if n:
                        last_delta = (t - t0) - last_t
                    last_t = t - t0
                    for sampler in samplers:
                        sampler.push(last_t, frame)
                    n += 1
                    size = (frame.width, frame.height)
        except av.error.FFmpegError as err:
            if n == 0:
                raise DecodeError(f"no decodable video frame: {err}") from None
            notes = [f"decoding stopped early after {n} frames: {err}"]
        else:
            notes = []
        if n == 0:
            raise DecodeError("the video stream holds no frames")
        if resampler is not None:
            for out in resampler.resample(None):
                audio_chunks.append(out.to_ndarray().reshape(-1))
        fps = _frame_rate(vstream, n, last_t)
        # The last frame lasts as long as the one before it (ffmpeg's end-of-stream estimate).
        for sampler in samplers:
            sampler.close(last_delta if last_delta > 0 else 1.0 / fps)
    audio = np.concatenate(audio_chunks).astype(np.int16) if audio_chunks else None
    return DecodedClip(
        fps=fps, width=size[0], height=size[1], n_frames=n, duration=last_t + 1.0 / fps,
        has_audio_stream=astream is not None, audio=audio, notes=notes,
        stated_duration=stated if stated and stated > 0 else None,
    )


def _frame_rate(stream: av.video.stream.VideoStream, n: int, last_t: float) -> float:
    """The nominal rate when the container states one, else the measured one."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 1 <= float(rate) <= 240:
            return float(rate)
    return (n - 1) / last_t if n > 1 and last_t > 0 else 30.0


def slots_for(duration: float, rate: float) -> int:
    """How many slots a clip of ``duration`` seconds yields at ``rate``."""
    return max(1, math.ceil(duration * rate - EPS))
