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
    from pipelines.stages.faces import FacesConfig
    from pipelines.stages.flow import FlowConfig

VIDEO_STAGES = ("frames", "flow", "faces", "face_features")
TRUNCATION_TOLERANCE_S = 0.5  # decoded length this much under the header's: cut short


def clip_quality(clip: dict, outputs: dict[str, dict[str, np.ndarray]], failures: dict[str, str],
                 stages: list[str], audio_cfg: AudioConfig) -> dict[str, dict]:
    """The flags of one kept clip (flag -> measured values) from its stage outputs and failures."""
    flags: dict[str, dict] = {}
    video = outputs.get("frames") or outputs.get("flow") or outputs.get("faces")
    if any(s in stages for s in VIDEO_STAGES):
        if video is None:
            reason = next((failures[s] for s in VIDEO_STAGES if s in failures), "no video output")
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
    if any(r.startswith("internal error") for r in failures.values()):
        return False
    video = [s for s in VIDEO_STAGES if s in stages]
    video_ok = bool(video) and not any(s in failures for s in video)
    audio_ok = "audio" in stages and "audio" not in failures
    return video_ok or audio_ok or not (video or "audio" in stages)


def placeholder(stage: str, audio_cfg: AudioConfig, faces_cfg: FacesConfig, flow_cfg: FlowConfig | None = None) -> dict[str, np.ndarray]:
    """A stage's output for a kept clip whose video (or audio) did not decode, so every sample
    has the same keys: no frames or flow (count 0; one 16-pixel black tile), one face slot with mask 0
    and zero features, or an empty waveform with the spectrogram of silence."""
    from pipelines.stages.audio import AUDIO_SR, spectrogram
    from pipelines.stages.frames import encode_strip

    if stage == "frames":
        strip, stride = encode_strip([np.zeros((16, 16, 3), np.uint8)], 90)
        return {"strip": np.frombuffer(strip, np.uint8), "stride": np.int64(stride), "times": np.zeros(0, np.float32)}
    if stage == "flow":
        from pipelines.stages.flow import FlowConfig, flow_layout

        strip, stride = encode_strip([np.zeros((16, 16), np.uint8)], 90)
        return {"x_strip": np.frombuffer(strip, np.uint8), "y_strip": np.frombuffer(strip, np.uint8), "stride": np.int64(stride),
                "times": np.zeros(0, np.float32), "pairs": np.zeros(0, np.int64), **flow_layout(flow_cfg or FlowConfig())}
    if stage == "faces":
        out = {"times": np.zeros(1, np.float32), "boxes": np.zeros((1, 4), np.float32), "probs": np.zeros(1, np.float32),
               "mask": np.zeros(1, np.uint8), "detected": np.zeros(1, np.uint8)}
        if faces_cfg.keep_crops:
            out.update(crops_jpeg=np.zeros(0, np.uint8), crops_offsets=np.zeros(1, np.int64), crop_size=np.int64(faces_cfg.size))
        return out
    if stage == "face_features":
        return {"feats": np.zeros((1, 1408), np.float16)}
    if stage == "audio":
        return {"wav": np.zeros(0, np.int16), "spec": spectrogram(np.zeros(AUDIO_SR, np.int16), audio_cfg).astype(np.float16)}
    raise ValueError(f"no placeholder for stage {stage!r}")
