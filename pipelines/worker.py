"""Work on a chunk of clips inside one worker process: one decode per clip feeds every
stage that still has work; models are loaded once per process; failures become records.

Nothing here names a stage: each stage's hooks (``pipelines/stages/base.py``) say what it
samples from the decode, computes after it, or batches until the chunk's end."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.cache import ClipCache
from pipelines.config import PreprocessConfig
from pipelines.stages.base import STAGES, Stage, StageError, stage_order, video_stages
from pipelines.stages.decode import DecodedClip, DecodeError, decode_clip
from pipelines.storage import Storage


@dataclass
class ClipJob:
    clip_id: str
    video: str
    wav: str | None
    keys: dict[str, str]  # stage -> cache key
    todo: list[str]  # stages to compute, in stage order
    window: tuple[float, float | None] | None = None  # (start, end) s of the file; None: all of it


@dataclass
class ClipWork:
    """One clip in a worker, as its stages' hooks see it (``Stage.begin``, ``compute``, ...)."""

    job: ClipJob
    cfg: PreprocessConfig
    cache: ClipCache
    resources: dict[str, Any]  # this process's: models, kept across chunks ("threads": its thread budget)
    video_stages: list[str]  # the stages that read the video (a failed decode fails them)
    samplers: list = field(default_factory=list)  # decode sinks (``FrameSampler``-like), filled by ``begin``
    audio_track: set[str] = field(default_factory=set)  # stages that want the video's audio track
    state: dict[str, Any] = field(default_factory=dict)  # per-clip state of the stages
    decoded: DecodedClip | None = None  # after a successful decode (its ``audio``: the track, when asked for)
    video_info: dict[str, np.ndarray] = field(default_factory=dict)  # ``video_info(decoded)``
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # computed in this run

    def want_audio_track(self, stage: str) -> None:
        self.audio_track.add(stage)

    def input(self, stage: str) -> dict[str, np.ndarray]:
        """An upstream stage's output for this clip: computed in this run, else from the cache."""
        if stage in self.outputs:
            return self.outputs[stage]
        return self.cache.load(stage, self.job.clip_id, self.job.keys[stage])


@dataclass
class ClipOutcome:
    clip_id: str
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


_STATE: dict[str, object] = {}


def run_stages(cfg: PreprocessConfig) -> list[type[Stage]]:
    """The run's stage classes, in stage order (an engine sends them with the work)."""
    return [STAGES.get(s) for s in stage_order() if s in cfg.stages]


def warm_up(cfg: PreprocessConfig) -> None:
    """Pay one-off import and JIT costs once, in the parent: forked workers inherit them
    (librosa's first transform takes ~3 s per process otherwise); export the models."""
    for stage in run_stages(cfg):
        stage.warm_up(cfg)
    export_models(cfg)  # once, before workers fork


def export_models(cfg: PreprocessConfig) -> None:
    """Export (or find in the cache) the model files this run's stages load, e.g. the face
    networks with the ONNX backend."""
    for stage in run_stages(cfg):
        stage.export_models(cfg)


def init_worker(cfg: PreprocessConfig, threads: int) -> None:
    """Pool initializer: remember the config; models are built on first use.

    Thread pools (BLAS, OpenMP, torch) get ``threads`` each, so N workers never run more
    threads than cores: oversubscribed BLAS threads spin and halved throughput here.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(max(1, threads))
    for stage in run_stages(cfg):
        stage.start_worker(cfg, max(1, threads))
    _STATE.clear()
    _STATE["cfg"] = cfg
    # The stages' models, built on first use and kept across chunks; "threads": ONNX Runtime's
    # intra-op threads, as torch's.
    _STATE["resources"] = {"threads": max(1, threads)}


def process_chunk(jobs: list[ClipJob]) -> list[ClipOutcome]:
    cfg: PreprocessConfig = _STATE["cfg"]
    cache = ClipCache(Storage(cfg.out))
    video = video_stages()
    outcomes = {job.clip_id: ClipOutcome(job.clip_id) for job in jobs}
    later: list[tuple[ClipWork, type[Stage], bool]] = []
    for job in jobs:
        try:
            later += _process_clip(ClipWork(job, cfg, cache, _STATE["resources"], video), outcomes[job.clip_id])
        except Exception as err:  # never let one clip end the run
            reason = f"internal error: {type(err).__name__}: {err}"
            for stage in job.todo:
                outcomes[job.clip_id].failed.setdefault(stage, reason)
            _STATE.setdefault("errors", []).append(traceback.format_exc())
    if later:
        _finish_chunk(later, outcomes)
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


def _process_clip(work: ClipWork, outcome: ClipOutcome) -> list[tuple[ClipWork, type[Stage], bool]]:
    """Every stage the clip still needs, in stage order, around one decode; return what waits
    for the chunk's end: (clip, stage, whether the stage deferred its output itself)."""
    job = work.job
    stages = [STAGES.get(s) for s in job.todo]
    for stage in stages:
        stage.begin(work)
    if work.samplers or work.audio_track:
        try:
            decoded = decode_clip(job.video, work.samplers, want_audio=bool(work.audio_track), window=job.window)
        except DecodeError as err:
            video = set(work.video_stages)
            for stage in stages:
                if stage.name in video or stage.name in work.audio_track:
                    outcome.failed[stage.name] = f"decode: {err}"
            for stage in stages:
                stage.abandon(work)
        else:
            work.decoded, work.video_info = decoded, video_info(decoded)
    later: list[tuple[ClipWork, type[Stage], bool]] = []
    waiting: set[str] = set()
    for stage in stages:
        if _upstream_failed(stage, outcome):
            continue
        if waiting & set(stage.inputs):  # an input comes at the chunk's end: so does this stage
            later.append((work, stage, False))
            waiting.add(stage.name)
            continue
        try:
            out = stage.compute(work)
        except StageError as err:
            outcome.failed[stage.name] = str(err)
            continue
        if out is None:
            later.append((work, stage, True))
            waiting.add(stage.name)
        else:
            _save(work, stage, out, outcome)
    return later


def _upstream_failed(stage: type[Stage], outcome: ClipOutcome) -> bool:
    """Whether the stage failed already (a decode) or an input of it did (same reason)."""
    if stage.name in outcome.failed:
        return True
    reason = next((outcome.failed[i] for i in stage.inputs if i in outcome.failed), None)
    if reason is not None:
        outcome.failed[stage.name] = reason
    return reason is not None


def _finish_chunk(later: list[tuple[ClipWork, type[Stage], bool]], outcomes: dict[str, ClipOutcome]) -> None:
    """The outputs that waited for the chunk's end (batched work), in clip then stage order."""
    for work, stage, deferred in later:
        outcome = outcomes[work.job.clip_id]
        if _upstream_failed(stage, outcome):
            continue
        try:
            out = None if deferred else stage.compute(work)  # its inputs are here now
            if out is None:
                out = stage.finish(work)
        except StageError as err:
            outcome.failed[stage.name] = str(err)
            continue
        _save(work, stage, out, outcome)


def _save(work: ClipWork, stage: type[Stage], out: dict[str, np.ndarray], outcome: ClipOutcome) -> None:
    work.cache.save(stage.name, work.job.clip_id, work.job.keys[stage.name], out)
    work.outputs[stage.name] = out
    outcome.done.append(stage.name)
