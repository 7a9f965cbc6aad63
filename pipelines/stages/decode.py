"""One in-process decode per clip (PyAV): every stage gets the frames it asked for, and the
audio track when the clip has no WAV, from a single demux pass.

Frame selection follows ffmpeg's ``fps=R:round=up`` filter: output slot n (at n/R seconds
from the first frame) gets the frame on screen at that instant, i.e. the last frame whose
timestamp is <= n/R. For constant-rate video this is the first frame of each 1/R-second
step (frames 0, 30, 60 of a 30 fps clip at R=1); a 2.5 s clip gives 3 frames at R=1. A frame
that spans several slots (very low frame rate) fills each of them, as ffmpeg does.

A clip window ``(start, end)`` (AVE events, VGGSound's 10 s windows) moves the time origin
to ``start``: slot 0 gets the frame on screen at ``start``, no slot reaches ``end``, and the
audio track is cut to the same [start, end) by its own timestamps, so frames and audio stay
aligned. Long files are seeked to shortly before ``start`` instead of decoded from 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import av
import numpy as np

AUDIO_SR = 16000
EPS = 1e-3  # container timestamps are in milliseconds for FLV
SEEK_MARGIN_S = 2.0  # seek this far before a window's start: the keyframe and audio lead-in

FrameSink = Callable[[int, float, np.ndarray], None]  # (slot index, slot time s, RGB frame)


class FrameSampler:
    """Streams frames in and emits (slot, time, frame) at a fixed rate; ``rate=None`` = every frame."""

    def __init__(self, rate: float | None, sink: FrameSink) -> None:
        self.rate = rate
        self.sink = sink
        self.next_slot = 0
        self._prev: tuple[float, av.VideoFrame] | None = None

    def push(self, t: float, frame: av.VideoFrame) -> None:
        """A frame at ``t`` seconds from the clip's origin (negative: before a window's start;
        the last such frame is the one on screen at 0)."""
        if self.rate is None:
            if t < -EPS:
                return
            self.sink(self.next_slot, t, frame.to_ndarray(format="rgb24"))
            self.next_slot += 1
            return
        if self._prev is not None:
            self._emit_until(t, margin=EPS)
        self._prev = (t, frame)

    def close(self, frame_duration: float, limit: float | None = None) -> None:
        """Flush the last frame, which covers [t_last, t_last + frame_duration), cut at ``limit``
        (a window's length) when given."""
        if self.rate is not None and self._prev is not None:
            end = self._prev[0] + frame_duration
            self._emit_until(end if limit is None else min(end, limit), margin=1e-9)
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


def decode_clip(path: str, samplers: list[FrameSampler], want_audio: bool = False,
                window: tuple[float, float | None] | None = None) -> DecodedClip:
    """Decode the video stream once, feeding every sampler; optionally decode the audio track.
    ``window`` = (start, end) seconds (end None: to the end of the file) limits both."""
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
        audio_t0: float | None = None  # time of the first audio frame decoded (windows only)
        t0: float | None = None
        start, end = (window[0], window[1]) if window is not None else (0.0, None)
        if window is not None:
            # The window is on the file's own clock: its first video timestamp is 0.
            t0 = float(vstream.start_time * vstream.time_base) if vstream.start_time is not None else 0.0
            if start > SEEK_MARGIN_S:
                container.seek(int((t0 + start - SEEK_MARGIN_S) * av.time_base), backward=True)
        seen: dict[int, float] = {}  # stream index -> latest packet time (windows only)
        last_t = 0.0
        last_delta = 0.0
        n = 0
        size = (vstream.codec_context.width, vstream.codec_context.height)
        try:
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if isinstance(frame, av.AudioFrame):
                        if audio_t0 is None and frame.time is not None:
                            audio_t0 = float(frame.time)
                        for out in resampler.resample(frame):
                            audio_chunks.append(out.to_ndarray().reshape(-1))
                        continue
                    t = float(frame.time) if frame.time is not None else n / float(vstream.average_rate or 30)
                    if t0 is None:
                        t0 = t
                    rel = t - t0 - start
                    if end is not None and rel >= end - start - EPS:
                        continue  # past the window; the audio may still need packets
                    if n:
                        last_delta = rel - last_t
                    last_t = rel
                    for sampler in samplers:
                        sampler.push(rel, frame)
                    if rel >= -EPS:
                        n += 1
                    size = (frame.width, frame.height)
                if end is not None and packet.pts is not None and packet.time_base is not None:
                    # Packets interleave: stop once every stream read is a second past the end.
                    seen[packet.stream.index] = float(packet.pts * packet.time_base)
                    if all(seen.get(st.index, -1.0) > t0 + end + 1.0 for st in streams):
                        break
        except av.error.FFmpegError as err:
            if n == 0:
                raise DecodeError(f"no decodable video frame: {err}") from None
            notes = [f"decoding stopped early after {n} frames: {err}"]
        else:
            notes = []
        if n == 0:
            raise DecodeError("the video stream holds no frames" if window is None
                              else f"the video stream holds no frame in the window {start:g}-{end} s")
        if resampler is not None:
            for out in resampler.resample(None):
                audio_chunks.append(out.to_ndarray().reshape(-1))
        fps = _frame_rate(vstream, n, last_t)
        # The last frame lasts as long as the one before it (ffmpeg's end-of-stream estimate).
        limit = None if end is None else end - start
        for sampler in samplers:
            sampler.close(last_delta if last_delta > 0 else 1.0 / fps, limit)
    audio = np.concatenate(audio_chunks).astype(np.int16) if audio_chunks else None
    duration = max(last_t, 0.0) + 1.0 / fps
    if window is not None:
        duration = min(duration, limit) if limit is not None else duration
        if audio is not None:
            audio = cut_audio(audio, (audio_t0 if audio_t0 is not None else t0) - t0, start, end)
        if stated is not None:
            stated = min(stated - start, limit) if limit is not None else stated - start
    return DecodedClip(
        fps=fps, width=size[0], height=size[1], n_frames=n, duration=duration,
        has_audio_stream=astream is not None, audio=audio, notes=notes,
        stated_duration=stated if stated and stated > 0 else None,
    )


def cut_audio(audio: np.ndarray, first_s: float, start: float, end: float | None) -> np.ndarray:
    """The samples of [start, end) from a track whose first sample is at ``first_s`` seconds
    (zeros where the track begins after ``start``, as a player would play silence)."""
    lo = int(round((start - first_s) * AUDIO_SR))
    if lo < 0:
        audio = np.concatenate([np.zeros(-lo, np.int16), audio])
        lo = 0
    hi = None if end is None else lo + int(round((end - start) * AUDIO_SR))
    return audio[lo:hi]


def _frame_rate(stream: av.video.stream.VideoStream, n: int, last_t: float) -> float:
    """The nominal rate when the container states one, else the measured one."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 1 <= float(rate) <= 240:
            return float(rate)
    return (n - 1) / last_t if n > 1 and last_t > 0 else 30.0


def slots_for(duration: float, rate: float) -> int:
    """How many slots a clip of ``duration`` seconds yields at ``rate``."""
    return max(1, math.ceil(duration * rate - EPS))
