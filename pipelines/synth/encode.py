"""Write synthetic clips: CREMA-D's Flash video (FLV1 + MP3) and 16 kHz PCM WAV, or any
container PyAV writes (MP4 with H.264 + AAC, AVI with MPEG-4 Part 2)."""

from __future__ import annotations

import os
import wave
from fractions import Fraction

import av
import numpy as np

FLV_AUDIO_RATE = 22050  # FLV's MP3 track supports 11,025 / 22,050 / 44,100 Hz only


def write_wav(path: str, audio: np.ndarray, sr: int) -> None:
    """Mono int16 PCM, written to a temporary name then renamed."""
    pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2")
    tmp = path + ".part"
    with wave.open(tmp, "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sr)
        fh.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def resample_linear(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Linear-interpolation resampling; enough for an up-sampled synthetic track."""
    n_out = int(round(len(audio) * sr_out / sr_in))
    return np.interp(np.arange(n_out) * sr_in / sr_out, np.arange(len(audio)), audio).astype(np.float32)


def write_flv(path: str, frames: np.ndarray, fps: int, audio: np.ndarray | None, sr: int, bit_rate: int = 900_000) -> None:
    """Encode frames (N, H, W, 3 uint8) and an optional mono track into an FLV file
    (Flash video + MP3, CREMA-D's containers)."""
    encode_video(path, frames, fps, audio, sr, "flv", "flv", "libmp3lame", FLV_AUDIO_RATE, bit_rate=bit_rate)


# extension -> (container, video codec, audio codec, audio rate): what such files usually hold
CONTAINERS = {
    ".mp4": ("mp4", "libx264", "aac", 44100),  # YouTube downloads (AVE, VGGSound, Kinetics)
    ".mkv": ("matroska", "libx264", "aac", 44100),
    ".webm": ("webm", "libvpx-vp9", "libopus", 48000),
    ".avi": ("avi", "mpeg4", "libmp3lame", 44100),  # UCF-101's AVIs hold MPEG-4 Part 2 (xvid)
}


def write_video(path: str, frames: np.ndarray, fps: int, audio: np.ndarray | None, sr: int,
                bit_rate: int | None = None) -> None:
    """Encode frames (N, H, W, 3 uint8) and an optional mono float track in [-1, 1] into the
    container the extension names (mp4/mkv: H.264 + AAC; webm: VP9 + Opus; avi: MPEG-4 +
    MP3; flv: ``write_flv``)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".flv":
        write_flv(path, frames, fps, audio, sr)
        return
    fmt, vcodec, acodec, arate = CONTAINERS[ext]
    options = {"preset": "veryfast", "crf": "23"} if vcodec == "libx264" and bit_rate is None else None
    encode_video(path, frames, fps, audio, sr, fmt, vcodec, acodec, arate, bit_rate=bit_rate, options=options)


def encode_video(path: str, frames: np.ndarray, fps: int, audio: np.ndarray | None, sr: int, fmt: str, vcodec: str,
                 acodec: str, audio_rate: int, bit_rate: int | None = None, options: dict | None = None) -> None:
    """Write ``frames`` and the optional track with the given container and codecs, to a
    temporary name then renamed.

    Audio is fed alongside the video, frame by frame: FLV needs its packets in time order,
    and ffmpeg's interleaving buffer would not hold a long clip's whole video.
    """
    tmp = path + ".part"
    with av.open(tmp, "w", format=fmt) as out:
        vstream = out.add_stream(vcodec, rate=fps)
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        if bit_rate is not None:
            vstream.bit_rate = bit_rate
        if options:
            vstream.options = options
        pcm = astream = None
        if audio is not None:
            astream = out.add_stream(acodec, rate=audio_rate, layout="mono")
            astream.bit_rate = 64_000
            track = resample_linear(audio, sr, audio_rate)
            pcm = np.clip(np.round(track * 32767), -32768, 32767).astype(np.int16)[None, :]
        fed = 0
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vstream.encode(frame):
                out.mux(packet)
            if pcm is not None:
                upto = pcm.shape[1] if i == len(frames) - 1 else min(pcm.shape[1], (i + 1) * audio_rate // fps)
                if upto > fed:
                    aframe = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, fed:upto]), format="s16", layout="mono")
                    aframe.sample_rate = audio_rate
                    aframe.pts = fed
                    aframe.time_base = Fraction(1, audio_rate)
                    for packet in astream.encode(aframe):
                        out.mux(packet)
                    fed = upto
        for stream in (vstream, astream):
            if stream is not None:
                for packet in stream.encode():
                    out.mux(packet)
    os.replace(tmp, path)
