"""The stage contract, the stage registry and the stage graph.

A stage is one class in its own module of this package, registered by name with
``@STAGES.register("name")``. Everything the runner, the worker, the engines and ``pack``
need from it is stated on the class, so adding a stage touches its own file only:

- ``version``, ``inputs`` and ``Config`` (its settings, a dataclass): its output for a clip is
  cached under a key made of (stage name, stage version, its config, the keys of its inputs)
  (``cache_key``). Changing one stage's config changes its key and the keys of the stages
  that consume its output, so exactly those are redone. ``inputs`` name upstream stages or
  the clip's sources (``SOURCES``): they order the stages (``stage_order``), refuse a run that
  selects a stage without one it reads (``check_selection``), and mark the stages that read
  the video (``video_stages``: a failed decode fails them; quality flags).
- ``rank`` breaks ties between stages the graph leaves unordered; ``per_clip`` is False for
  the final stage (``pack``), which reads every per-clip stage; ``heavy`` marks stages that
  run neural networks (``--device``, ``--backend``): the Ray engine runs their chunks on
  long-lived actors that load the models once.
- The worker's hooks (``begin`` before a clip's one decode, ``compute`` after it, ``finish``
  at the end of the chunk for work batched across clips, ``abandon`` when the decode failed),
  the run's hooks (``resolve``, ``warm_up``, ``export_models``, ``start_worker``) and pack's
  (``placeholder``, ``pack``). Every hook has a default that does nothing or the plain thing.

A module of this package that registers a stage is imported when the graph is first needed
(``load_stages``); a stage defined elsewhere is registered by importing its module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import os
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import numpy as np

from avbalance.errors import UserError
from avbalance.registry import Registry

if TYPE_CHECKING:
    from pipelines.config import PreprocessConfig
    from pipelines.worker import ClipWork

SOURCES = ("video", "audio_source")  # inputs that are a clip's files, not stages (runner.stage_keys)


def stable_hash(*parts: Any) -> str:
    """sha256 of a JSON rendering of ``parts`` (dataclasses as dicts, sorted keys)."""
    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.asdict(x)
        return x

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class StageError(Exception):
    """A clip this stage cannot process; the message is the failure's reason (status.jsonl)."""


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """The settings of a stage that has none."""


class Stage:
    """Base class: subclasses set ``version``, ``inputs`` and ``Config`` (the name comes from
    the ``STAGES.register`` decorator) and override the hooks they need."""

    name: ClassVar[str]
    version: ClassVar[int]
    inputs: ClassVar[tuple[str, ...]]  # upstream stage names or SOURCES
    Config: ClassVar[type] = NoConfig
    rank: ClassVar[int] = 100  # among stages the graph leaves unordered, lower runs (and is listed) first
    per_clip: ClassVar[bool] = True  # False: the final stage, after every per-clip stage (pack)
    heavy: ClassVar[bool] = False  # runs neural networks: Ray runs its chunks on model-holding actors

    def __init__(self, config: Any) -> None:
        self.config = config

    # -- configuration and cache keys (the runner) --

    @classmethod
    def config_of(cls, cfg: PreprocessConfig) -> Any:
        """This stage's settings in a run's config: the field named after it, else the defaults."""
        value = getattr(cfg, cls.name, None)
        return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else cls.Config()

    @classmethod
    def cache_key(cls, config: Any, input_keys: dict[str, str]) -> str:
        """The key of a clip's output from the keys of its inputs (no model is built)."""
        return stable_hash(cls.name, cls.version, config, [input_keys[i] for i in cls.inputs])

    def key(self, input_keys: dict[str, str]) -> str:
        return self.cache_key(self.config, input_keys)

    @classmethod
    def resolve(cls, cfg: PreprocessConfig) -> None:
        """Before any work, when the stage is selected: check or complete its settings in ``cfg``
        (e.g. hash a weights file); raise UserError to refuse the run."""

    # -- process set-up (the engines) --

    @classmethod
    def export_models(cls, cfg: PreprocessConfig) -> None:
        """Write the files this stage's workers load (e.g. ONNX exports), once, before they start."""

    @classmethod
    def warm_up(cls, cfg: PreprocessConfig) -> None:
        """One-off import and JIT costs, paid before workers fork (they inherit them)."""

    @classmethod
    def start_worker(cls, cfg: PreprocessConfig, threads: int) -> None:
        """In each worker process, before its first chunk (e.g. size a library's thread pool)."""

    # -- one clip in a worker (pipelines/worker.py), in stage order --

    @classmethod
    def begin(cls, work: ClipWork) -> None:
        """Before the clip's one decode: add frame samplers (``work.samplers``), ask for the
        video's audio track (``work.want_audio_track``), keep per-clip state in ``work.state``."""

    @classmethod
    def compute(cls, work: ClipWork) -> dict[str, np.ndarray] | None:
        """After the decode: the clip's output (cached by the worker), or None when it comes at
        the end of the chunk (``finish``). Raise StageError for a clip the stage cannot process.
        Inputs: ``work.input(stage)``, ``work.decoded``, ``work.video_info``."""
        raise NotImplementedError(f"stage {cls.name!r} computes nothing per clip")

    @classmethod
    def finish(cls, work: ClipWork) -> dict[str, np.ndarray]:
        """At the end of the chunk: the output ``compute`` deferred (work batched across clips)."""
        raise NotImplementedError(f"stage {cls.name!r} deferred nothing")

    @classmethod
    def abandon(cls, work: ClipWork) -> None:
        """The clip's decode failed: release what ``begin`` took."""

    # -- packing (pipelines/stages/pack.py) --

    @classmethod
    def placeholder(cls, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
        """The output of a kept clip this stage failed on, so every sample has the same keys."""
        raise ValueError(f"no placeholder for stage {cls.name!r}")

    @classmethod
    def pack(cls, out: dict[str, np.ndarray], clip: dict, pack_config: Any) -> tuple[dict[str, bytes], dict]:
        """A clip's output as shard members (name -> bytes) and fields of the sample's json.
        Default: each array as ``<stage>_<array>.npy``."""
        return {f"{cls.name}_{k}.npy": npy_bytes(np.asarray(v)) for k, v in sorted(out.items())}, {}


STAGES: Registry[type[Stage]] = Registry("stage")

_LOADED: list[bool] = []


def load_stages() -> None:
    """Import every module of this package that registers a stage (once per process). Only
    modules whose text registers one are imported: helpers (and torch) load when used."""
    if _LOADED:
        return
    folder = os.path.dirname(os.path.abspath(__file__))
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".py") and entry != "base.py":
            with open(os.path.join(folder, entry), encoding="utf-8") as fh:
                if "@STAGES.register(" in fh.read():
                    importlib.import_module(f"{__package__}.{entry[:-3]}")
    _LOADED.append(True)


def stage_order() -> list[str]:
    """Every registered stage in run order: a topological order of ``inputs`` (a stage after
    the stages it reads; final stages after every per-clip one), ties broken by ``rank``, then
    name. The shipped stages: frames, flow, faces, face_features, audio, pack (the pack key
    hashes this order)."""
    load_stages()
    classes = {name: STAGES.get(name) for name in STAGES.names()}
    needs: dict[str, set[str]] = {}
    for name, cls in classes.items():
        unknown = [i for i in cls.inputs if i not in classes and i not in SOURCES]
        if unknown:
            raise ValueError(f"stage {name!r} reads {', '.join(unknown)}: neither a registered stage "
                             f"nor a source ({', '.join(SOURCES)})")
        needs[name] = {i for i in cls.inputs if i in classes}
        if not cls.per_clip:
            needs[name] |= {n for n, c in classes.items() if c.per_clip}
    order: list[str] = []
    while len(order) < len(classes):
        ready = [n for n in classes if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"stages {', '.join(n for n in classes if n not in order)} read each other in a cycle")
        order.append(min(ready, key=lambda n: (classes[n].rank, n)))
    return order


def clip_stages() -> list[str]:
    """The per-clip stages (the worker's), in order."""
    return [n for n in stage_order() if STAGES.get(n).per_clip]


def video_stages() -> list[str]:
    """The per-clip stages that read the video, directly or through a stage that does."""
    reads: dict[str, bool] = {}
    for name in clip_stages():
        inputs = STAGES.get(name).inputs
        reads[name] = "video" in inputs or any(reads.get(i, False) for i in inputs)
    return [n for n, r in reads.items() if r]


def check_selection(stages: Iterable[str]) -> None:
    """Refuse unknown stage names and a stage selected without a stage it reads."""
    order = stage_order()
    selected = list(stages)
    bad = [s for s in selected if s not in order]
    if bad:
        raise UserError(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(order)}")
    for stage in sorted(selected, key=order.index):
        for needed in STAGES.get(stage).inputs:
            if needed in order and needed not in selected:
                raise UserError(f"the {stage} stage needs the {needed} stage: add {needed} to --stages")


def shipped(names: Iterable[str]) -> tuple[tuple[str, type[Stage]], ...]:
    """(name, class) of these stages, in stage order: what an engine sends with the work."""
    chosen = set(names)
    return tuple((n, STAGES.get(n)) for n in stage_order() if n in chosen)


def adopt(stages: Iterable[tuple[str, type[Stage]]]) -> None:
    """Register the stages (``shipped``) this process does not know: a worker elsewhere (a Ray
    task) then runs stages registered only in the driver, e.g. at run time."""
    for name, cls in stages:
        if name not in STAGES:
            STAGES.register(name)(cls)
