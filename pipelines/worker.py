"""Work on a chunk of clips inside one worker process: one decode per clip feeds every
stage that still has work; models are loaded once per process; failures become records."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import numpy as np

from pipelines.cache import ClipCache
from pipelines.config import PreprocessConfig
from pipelines.stages.audio import AudioError, AudioStage, read_wav
from pipelines.stages.decode import DecodedClip, DecodeError, FrameSampler, cut_audio, decode_clip
from pipelines.stages.flow import FlowStage
from pipelines.stages.frames import FramesStage
from pipelines.storage import Storage

VIDEO_STAGES = ("frames", "flow", "faces", "face_features")


@dataclass
class ClipJob:
    clip_id: str
    video: str
    wav: str | None
    keys: dict[str, str]  # stage -> cache key
    todo: list[str]  # stages to compute
    face_boxes_cached: bool = False  # faces done earlier: reuse boxes, skip detection
    window: tuple[float, float | None] | None = None  # (start, end) s of the file; None: all of it


@dataclass
class ClipOutcome:
    clip_id: str
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


_STATE: dict[str, object] = {}


def warm_up(cfg: PreprocessConfig) -> None:
    """Pay one-off import and JIT costs once, in the parent: forked workers inherit them
    (librosa's first transform takes ~3 s per process otherwise)."""
    if "audio" in cfg.stages:
        from pipelines.stages.audio import spectrogram

        spectrogram(np.full(1600, 100, np.int16), cfg.audio)
    if "faces" in cfg.stages:
        import facenet_pytorch  # noqa: F401
        import timm  # noqa: F401

        export_face_networks(cfg)  # once, before workers fork


def export_face_networks(cfg: PreprocessConfig) -> None:
    """With the ONNX backend, export (or find in the cache) the face networks this run needs."""
    if cfg.backend != "onnx" or "faces" not in cfg.stages:
        return
    from pipelines.stages.face_features import export_onnx
    from pipelines.stages.faces import export_mtcnn

    export_mtcnn()
    if "face_features" in cfg.stages:
        export_onnx(cfg.face_features)


def init_worker(cfg: PreprocessConfig, threads: int) -> None:
    """Pool initializer: remember the config; models are built on first use.

    Thread pools (BLAS, OpenMP, torch) get ``threads`` each, so N workers never run more
    threads than cores: oversubscribed BLAS threads spin and halved throughput here.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(max(1, threads))
    if "faces" in cfg.stages:
        import torch

        torch.set_num_threads(max(1, threads))
    _STATE.clear()
    _STATE["cfg"] = cfg
    _STATE["threads"] = max(1, threads)  # ONNX Runtime's intra-op threads, as torch's


def _batcher():
    if "batcher" not in _STATE:
        from pipelines.stages.face_features import FaceFeaturesStage
        from pipelines.stages.faces import FaceBatcher
        from pipelines.stages.onnx_backend import resolve_backend

        cfg: PreprocessConfig = _STATE["cfg"]
        # The runner resolved "auto" already; a worker on another node checks onnxruntime is there.
        backend, threads = resolve_backend(cfg.backend, cfg.device), _STATE.get("threads")
        featurizer = (FaceFeaturesStage(cfg.face_features, cfg.device, backend, threads)
                      if "face_features" in cfg.stages else None)
        _STATE["batcher"] = FaceBatcher(cfg.faces, featurizer, cfg.device, cfg.batch_size, backend, threads)
    return _STATE["batcher"]


def process_chunk(jobs: list[ClipJob]) -> list[ClipOutcome]:
    cfg: PreprocessConfig = _STATE["cfg"]
    cache = ClipCache(Storage(cfg.out))
    outcomes = {job.clip_id: ClipOutcome(job.clip_id) for job in jobs}
    face_jobs: list[tuple[ClipJob, np.ndarray]] = []
    for job in jobs:
        try:
            info = _process_clip(job, cfg, cache, outcomes[job.clip_id])
            if info is not None:
                face_jobs.append((job, info))
        except Exception as err:  # never let one clip end the run
            reason = f"internal error: {type(err).__name__}: {err}"
            for stage in job.todo:
                outcomes[job.clip_id].failed.setdefault(stage, reason)
            _STATE.setdefault("errors", []).append(traceback.format_exc())
    if face_jobs:
        _finish_faces(face_jobs, cfg, cache, outcomes)
    keys = {job.clip_id: job.keys for job in jobs}
    for out in outcomes.values():
        for stage, reason in out.failed.items():
            cache.save_failure(stage, out.clip_id, keys[out.clip_id][stage], reason)
    return list(outcomes.values())


def video_info(decoded: DecodedClip) -> dict[str, np.ndarray]:
    """What the frames and faces caches keep about the video: rate, size, length (decoded and
    as the header states it, NaN when it does not) and why decoding stopped early, if it did."""
    stated = decoded.stated_duration if decoded.stated_duration is not None else float("nan")
    return {
        "video_info": np.array([decoded.fps, decoded.width, decoded.height, decoded.n_frames, decoded.duration, stated], np.float64),
        "decode_note": np.array("; ".join(decoded.notes)),
    }


def _process_clip(job: ClipJob, cfg: PreprocessConfig, cache: ClipCache, outcome: ClipOutcome) -> dict[str, np.ndarray] | None:
    """Decode once, run frames and audio, queue face frames; return video info if faces queued."""
    samplers: list[FrameSampler] = []
    frames_stage = None
    if "frames" in job.todo:
        frames_stage = FramesStage(cfg.frames)
        samplers.append(FrameSampler(cfg.frames.rate, frames_stage.add))
    flow_stage = None
    if "flow" in job.todo:
        flow_stage = FlowStage(cfg.flow)
        samplers.append(flow_stage)  # sees every frame: flow is between consecutive ones
    wants_faces = "faces" in job.todo or "face_features" in job.todo
    if wants_faces:
        batcher = _batcher()
        if job.face_boxes_cached:
            cached = cache.load("faces", job.clip_id, job.keys["faces"])
            batcher.start_clip(job.clip_id, cached["boxes"], cached["mask"])
        else:
            batcher.start_clip(job.clip_id)
        samplers.append(FrameSampler(cfg.faces.fps, lambda slot, t, rgb: batcher.push(job.clip_id, slot, t, rgb)))
    track_audio = "audio" in job.todo and job.wav is None
    decoded = None
    if samplers or track_audio:
        try:
            decoded = decode_clip(job.video, samplers, want_audio=track_audio, window=job.window)
        except DecodeError as err:
            for stage in job.todo:
                if stage in VIDEO_STAGES or (stage == "audio" and track_audio):
                    outcome.failed[stage] = f"decode: {err}"
            if wants_faces:
                _batcher().flush()
                _batcher().finish_clip(job.clip_id)
            wants_faces = False
    info = None
    if decoded is not None:
        info = video_info(decoded)
        if frames_stage is not None:
            out = frames_stage.finish_clip()
            out.update(info)
            cache.save("frames", job.clip_id, job.keys["frames"], out)
            outcome.done.append("frames")
        if flow_stage is not None:
            out = flow_stage.finish_clip()
            out.update(info)
            cache.save("flow", job.clip_id, job.keys["flow"], out)
            outcome.done.append("flow")
    if "audio" in job.todo and "audio" not in outcome.failed:
        try:
            if job.wav is not None:
                wave = read_wav(job.wav)
                if job.window is not None:  # a sidecar WAV starts with its video
                    wave = cut_audio(wave, 0.0, *job.window)
            elif decoded is not None and decoded.audio is not None:
                wave = decoded.audio
            else:
                raise AudioError("no audio: the clip has no WAV file and its video has no audio stream")
            cache.save("audio", job.clip_id, job.keys["audio"], AudioStage(cfg.audio).process(wave))
            outcome.done.append("audio")
        except AudioError as err:
            outcome.failed["audio"] = str(err)
    return info if wants_faces else None


def _finish_faces(face_jobs, cfg: PreprocessConfig, cache: ClipCache, outcomes: dict[str, ClipOutcome]) -> None:
    batcher = _batcher()
    batcher.flush()
    for job, info in face_jobs:
        faces, feats = batcher.finish_clip(job.clip_id)
        outcome = outcomes[job.clip_id]
        if "faces" in job.todo:
            # A clip without a face is kept: all-zero mask and features, flagged no_face at pack.
            faces.update(info)
            cache.save("faces", job.clip_id, job.keys["faces"], faces)
            outcome.done.append("faces")
        if "face_features" in job.todo and feats is not None:
            cache.save("face_features", job.clip_id, job.keys["face_features"], feats)
            outcome.done.append("face_features")
