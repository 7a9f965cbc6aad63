"""Quality flags: what is unusual about a clip that still gives a sample, with the measured value.

A clip is kept whenever its video or its audio decodes (the published splits stay whole);
``pack`` writes these flags into each sample's JSON as ``quality`` and per part into
``shards.json``, and the trainer drops flagged samples only on request
(``data.exclude_quality``). The names are part of the shard format (docs/shards.md).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from avbalance.shard_format import QUALITY_FLAGS  # noqa: F401  (part of the shard format; re-exported)

if TYPE_CHECKING:  # the stages are imported where used: the trainer reads QUALITY_FLAGS cheaply
    from pipelines.stages.audio import AudioConfig

TRUNCATION_TOLERANCE_S = 0.5  # decoded length this much under the header's: cut short


def clip_quality(clip: dict, outputs: dict[str, dict[str, np.ndarray]], failures: dict[str, str],
                 stages: list[str], audio_cfg: AudioConfig) -> dict[str, dict]:
    """The flags of one kept clip (flag -> measured values) from its stage outputs and failures."""
    from pipelines.stages.base import video_stages

    flags: dict[str, dict] = {}
    video_order = video_stages()  # the stages that read the video, in stage order
    video = next((outputs[s] for s in video_order if s in outputs and "video_info" in outputs[s]), None)
    if any(s in stages for s in video_order):
        if video is None:
            reason = next((failures[s] for s in video_order if s in failures), "no video output")
            flags["no_video"] = {"reason": reason}
        else:
            _, _, _, n_frames, seconds, stated = video["video_info"].tolist()
            note = "; ".join(n for n in (clip.get("probe", {}).get("video", {}).get("truncated"),
                                         str(video["decode_note"]) if "decode_note" in video else "") if n)
            if note or (not math.isnan(stated) and stated - seconds > TRUNCATION_TOLERANCE_S):
                flags["truncated_video"] = {"seconds": round(seconds, 3), "frames": int(n_frames),
                                            "stated_seconds": None if math.isnan(stated) else round(stated, 3),
                                            **({"error": note} if note else {})}
    if "faces" in stages:
        faces = outputs.get("faces")
        found = int(faces["mask"].sum()) if faces is not None else 0
        if found == 0:
            flags["no_face"] = {"faces_found": 0, "face_frames": int(len(faces["mask"])) if faces is not None else 0}
    if "audio" in stages:
        audio = outputs.get("audio")
        if audio is None:
            flags["no_audio"] = {"reason": failures.get("audio", "no audio output")}
        else:
            if "wav" not in clip["files"]:
                flags["audio_from_video"] = {"source": "video track"}
            peak = float(audio["peak"])
            if peak < audio_cfg.silence_peak:
                flags["silent"] = {"peak": float(f"{peak:.3g}"), "threshold": audio_cfg.silence_peak}
            seconds = len(audio["wav"]) / 16000  # the stored waveform's rate
            if seconds < audio_cfg.min_duration:
                flags["short"] = {"seconds": round(seconds, 4), "minimum": audio_cfg.min_duration}
    return flags


def gives_sample(failures: dict[str, str], stages: list[str]) -> bool:
    """A clip gives a sample when its video or its audio decoded (internal errors never do)."""
    from pipelines.stages.base import video_stages

    if any(r.startswith("internal error") for r in failures.values()):
        return False
    video = [s for s in video_stages() if s in stages]
    video_ok = bool(video) and not any(s in failures for s in video)
    audio_ok = "audio" in stages and "audio" not in failures
    return video_ok or audio_ok or not (video or "audio" in stages)
