"""Cheap structural checks of media files, run for every file while building a manifest.

They read headers only (no decoding), so a full CREMA-D scan stays fast, yet they catch the
ways real copies break: Git LFS pointers instead of media, empty files, truncated files.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
LFS_FIX = "run `git lfs install && git lfs pull` inside the CREMA-D clone (or clone it with `git lfs clone`)"


@dataclass
class Probe:
    """The outcome of checking one file: ``problem`` is None when the file looks usable."""

    size: int
    problem: str | None = None
    info: dict[str, object] = field(default_factory=dict)


def is_lfs_pointer(head: bytes) -> bool:
    return head.startswith(LFS_MAGIC)


def probe_file(path: str) -> Probe:
    """Check one media file by its extension; never raises for a bad file."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return Probe(0, "empty file (0 bytes)")
        with open(path, "rb") as fh:
            head = fh.read(64)
            if is_lfs_pointer(head):
                return Probe(size, f"Git LFS pointer ({size} bytes of text), not media: {LFS_FIX}")
            ext = os.path.splitext(path)[1].lower()
            if ext == ".flv":
                return _probe_flv(fh, size)
            if ext == ".wav":
                return _probe_wav(fh, size)
            return Probe(size)
    except OSError as err:
        return Probe(0, f"unreadable: {err.strerror or err}")


def _probe_flv(fh, size: int) -> Probe:
    """Walk the FLV tag headers: truncation shows as a tag running past the end of file."""
    fh.seek(0)
    header = fh.read(9)
    if len(header) < 9 or header[:3] != b"FLV":
        return Probe(size, "not an FLV file (bad signature)")
    offset = struct.unpack(">I", header[5:9])[0] + 4  # skip PreviousTagSize0
    audio_tags = video_tags = 0
    last_ms = 0
    truncated = None
    while offset < size:
        fh.seek(offset)
        tag = fh.read(11)
        if len(tag) < 11:
            truncated = f"truncated FLV: a tag header is cut off at byte {offset} of {size}"
            break
        kind = tag[0] & 0x1F
        data_size = int.from_bytes(tag[1:4], "big")
        timestamp = int.from_bytes(tag[4:7], "big") | (tag[7] << 24)
        end = offset + 11 + data_size + 4
        if end > size:
            truncated = f"truncated FLV: the tag at byte {offset} needs {end - size} bytes past the end ({size} bytes on disk)"
            break
        if kind == 8:
            audio_tags += 1
        elif kind == 9:
            video_tags += 1
        last_ms = max(last_ms, timestamp)
        offset = end
    if video_tags == 0:
        return Probe(size, truncated or "FLV file has no video frames")
    info = {"video_packets": video_tags, "audio_packets": audio_tags, "duration_s": last_ms / 1000.0}
    if truncated:  # what precedes the cut still decodes: the clip is kept, flagged truncated_video
        info["truncated"] = truncated
    return Probe(size, None, info)


def _probe_wav(fh, size: int) -> Probe:
    """Check the RIFF chunks: the data chunk must hold the bytes its header declares."""
    fh.seek(0)
    riff = fh.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        return Probe(size, "not a WAV file (bad RIFF/WAVE header)")
    offset = 12
    info: dict[str, object] = {}
    while offset + 8 <= size:
        fh.seek(offset)
        chunk_id, chunk_size = struct.unpack("<4sI", fh.read(8))
        if chunk_id == b"fmt ":
            fmt = fh.read(16)
            if len(fmt) < 16:
                return Probe(size, "truncated WAV: the fmt chunk is cut off")
            _, channels, rate, _, block, bits = struct.unpack("<HHIIHH", fmt)
            info.update(channels=channels, sample_rate=rate, bits=bits, block=block)
        elif chunk_id == b"data":
            if "sample_rate" not in info:
                return Probe(size, "WAV data chunk comes before its fmt chunk")
            held = size - offset - 8
            if held < chunk_size:
                return Probe(
                    size,
                    f"truncated WAV: header declares {chunk_size} bytes of audio, file holds {held}",
                )
            info["duration_s"] = chunk_size / max(1, int(info["block"]) * int(info["sample_rate"]))
            return Probe(size, None, info)
        offset += 8 + chunk_size + (chunk_size & 1)
    return Probe(size, "truncated WAV: no data chunk")
