"""Run a grid of training runs from one YAML file: methods x fusions x presets x splits x seeds.

A sweep file::

    out: runs/paper                       # where the run folders go (``--out`` overrides)
    shards: data/cremad/shards/{split}    # a shard set per split; {split} (and {block}) filled in
    set: [train.bf16=true]                # overrides for every run (optional)
    blocks:
      - name: resnet_ogm                  # a block is one sub-grid
        preset: resnet                    # trainer/configs/resnet_<method>.yaml, or a path with {method}
        splits: [ogm]
        methods: [audio_only, visual_only, joint, mlb]   # preset suffixes: the controls too
        fusions: [late_linear, film]
        seeds: [0]
        set: [train.epochs=100]           # overrides for this block (optional)
        shards: other/shards/{split}      # this block's own shard sets (optional)

Each run lives in ``<out>/<block>/<method>-<fusion>/<split>-s<seed>/`` and is one
``cli.py train`` process (so a crash or a kill loses one run, not the sweep). A run is
finished when its ``eval_<test part>.json`` exists: a re-run skips it, resumes a run with a
``last.pt`` and restarts one killed before its first checkpoint. A run whose folder another
live process holds (trainer/run_lock.py: another sweep, a Slurm job, a user's own ``train``) is
not started: it is recorded as running elsewhere, with that process named. Combinations that cannot
run (OGM-GE and MMCosine on a non-decomposable fusion, a one-modality control with a fusion
that needs two) are listed as unsupported and not run: the sweep reads each preset's
balancing method and modalities to tell. ``sweep.json`` in ``out`` records every run's status
(``pending``, ``running`` here or elsewhere, ``done``, ``failed`` with the end of its log) and is
rewritten each time a run starts or ends; a line on stderr counts the runs finished, running,
failed and waiting at each of those moments (not under AVBALANCE_QUIET).

What runs is decided here, whatever the engine; where each run's train process runs is the
engine's (experiments/engines/: ``local`` subprocesses, ``ray`` tasks, ``slurm`` jobs). An
engine gets a ``RunTask`` per run and runs ``start_run`` on it where it runs its work, which
decides new or resume at that moment (so a retried or requeued run resumes), and reports each
run's start and end (``RunEnd``) back to ``run_sweep``, which keeps ``sweep.json``.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import yaml

from avbalance.errors import UserError
from avbalance.invocation import prog
from avbalance.progress import quiet
from trainer.run_lock import LOCK_NAME, hold_run_folder, holder, holder_text

if TYPE_CHECKING:
    from experiments.engines.base import SweepEngine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "cli.py")
BLOCK_KEYS = {"name", "preset", "splits", "methods", "fusions", "seeds", "set", "shards"}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    id: str
    block: str
    preset: str
    method: str
    fusion: str
    split: str
    seed: int
    config: str
    shards: str
    overrides: tuple[str, ...] = ()

    def folder(self, root: str) -> str:
        return os.path.join(root, *self.id.split("/"))

    def describe(self) -> dict[str, Any]:
        """What ``sweep_run.json`` holds (read by the report)."""
        return {"id": self.id, "block": self.block, "preset": self.preset, "method": self.method,
                "fusion": self.fusion, "split": self.split, "seed": self.seed}


@dataclass
class Sweep:
    """A loaded sweep file: the runs to do and the combinations left out."""

    path: str
    out: str
    runs: list[RunSpec] = field(default_factory=list)
    unsupported: list[dict[str, str]] = field(default_factory=list)
    out_given: str = ""  # where ``out`` came from, for messages: ``--out runs/x`` or the file's ``out`` (runs/x)
    out_written: str = ""  # ``out`` as written there, before it was made absolute


def _list(block: dict, key: str, where: str) -> list:
    value = block.get(key)
    if value is None:
        raise UserError(f"{where}: missing `{key}` (a list)")
    value = value if isinstance(value, list) else [value]
    if not value:
        raise UserError(f"{where}: `{key}` is empty")
    return value


def _preset_path(preset: str, method: str, base_dir: str) -> str:
    if preset.endswith(".yaml") or "/" in preset:
        path = preset.format(method=method)
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))
    return os.path.join(REPO, "trainer", "configs", f"{preset}_{method}.yaml")


def preset_balancing(config: str) -> tuple[str, list[str]]:
    """The balancing method a preset file trains with, and its modalities (in order).

    A sweep's method name is the preset's suffix: ``audio_only`` names the preset
    ``<family>_audio_only.yaml``, a one-modality model trained with ``joint``.
    """
    from trainer.config import load_config
    from trainer.run_config import RunConfig

    cfg = RunConfig.from_dict(load_config(config))
    return str(cfg.balancing.get("name")), list(cfg.model.encoders)


def for_modalities(overrides: list[str], modalities: list[str]) -> list[str]:
    """The overrides that apply to a model of ``modalities``: a sweep-wide setting of another
    modality's encoder (``model.encoders.visual.width=16``) is left out of a one-modality run
    rather than adding an encoder that the data does not feed."""
    def applies(text: str) -> bool:
        key = text.split("=", 1)[0].strip().split(".")
        return not (len(key) >= 3 and key[:2] == ["model", "encoders"] and key[2] not in modalities)
    return [o for o in overrides if applies(o)]


def unsupported_reason(method: str, fusion: str, config: str | None = None) -> str | None:
    """Why ``method`` (the preset ``config`` when given) cannot run with ``fusion``, or None:
    the method's ``requires`` and minimum modalities, and the fusion's, against the model."""
    from trainer.balancing import BALANCERS
    from trainer.fusion import FUSIONS

    balancer, modalities = preset_balancing(config) if config else (method, None)
    if balancer not in BALANCERS:
        raise UserError(f"unknown balancing method {balancer!r}{f' (in {config})' if config else ''}; "
                        f"known: {', '.join(BALANCERS.names())}")
    if fusion not in FUSIONS:
        raise UserError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS.names())}")
    cls, fusion_cls = BALANCERS.get(balancer), FUSIONS.get(fusion)
    if "decomposable_head" in cls.requires and not getattr(fusion_cls, "decomposable", False):
        return f"{balancer} needs a decomposable fusion head; {fusion} is not"
    if modalities is not None:
        if len(modalities) < cls.min_modalities:
            return f"{balancer} needs at least {cls.min_modalities} modalities; {method} has {len(modalities)}"
        if len(modalities) < getattr(fusion_cls, "min_modalities", 1):
            return f"{fusion} needs at least {fusion_cls.min_modalities} modalities; {method} has {len(modalities)}"
    return None


def load_sweep(path: str, out: str | None = None, shards: str | None = None) -> Sweep:
    """Read and expand a sweep file; every preset must exist and every name be registered.

    ``out`` and ``shards`` replace the file's own ``out`` and top-level ``shards`` template (a
    block with its own ``shards`` keeps it), so one file serves any working folder.
    """
    if not os.path.isfile(path):
        raise UserError(f"sweep config not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            doc = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("blocks"), list) or not doc["blocks"]:
        raise UserError(f"{path}: expected a mapping with a non-empty `blocks` list")
    base_dir = os.path.dirname(os.path.abspath(path))
    def shards_template(value: Any, where: str) -> str:
        if not isinstance(value, str) or "{split}" not in value:
            raise UserError(f"{where}: `shards` must be a path template containing {{split}}, e.g. data/shards/{{split}}")
        try:
            value.format(split="s", block="b")
        except (KeyError, IndexError, ValueError) as err:
            raise UserError(f"{where}: `shards` {value!r} may hold only {{split}} and {{block}} (the block's name) "
                            f"in braces, not {err}") from None
        return value

    if shards is not None:
        doc["shards"] = shards_template(shards, "--shards")
    sweep = Sweep(path=path, out=out or doc.get("out") or "")
    if not sweep.out:
        raise UserError(f"{path}: no `out` folder; set it in the file or pass --out")
    sweep.out_given = f"--out {out}" if out else f"the sweep file's `out` ({sweep.out})"
    sweep.out_written = sweep.out
    # Relative paths are relative to where the command runs (runs start in the repository).
    sweep.out = os.path.abspath(sweep.out)
    common = [str(s) for s in doc.get("set") or []]
    seen: set[str] = set()
    for i, block in enumerate(doc["blocks"]):
        where = f"{path}: blocks[{i}]"
        if not isinstance(block, dict):
            raise UserError(f"{where}: expected a mapping")
        unknown = set(block) - BLOCK_KEYS
        if unknown:
            raise UserError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(BLOCK_KEYS)}")
        name = str(block.get("name") or f"block{i}")
        preset = str(block.get("preset") or "")
        if not preset:
            raise UserError(f"{where}: missing `preset` (e.g. resnet)")
        extra = [str(s) for s in block.get("set") or []]
        # A block may read its own shards (e.g. a corpus made with other settings).
        shards_tpl = shards_template(block.get("shards", doc.get("shards")), where if "shards" in block else path)
        for method in _list(block, "methods", where):
            config = _preset_path(preset, method, base_dir)
            if not os.path.isfile(config):
                raise UserError(f"{where}: no preset for method {method!r}: {config} does not exist")
            for fusion in _list(block, "fusions", where):
                reason = unsupported_reason(str(method), fusion, config)
                for split in _list(block, "splits", where):
                    for seed in _list(block, "seeds", where):
                        run_id = f"{name}/{method}-{fusion}/{split}-s{int(seed)}"
                        if run_id in seen:
                            raise UserError(f"{where}: run {run_id} appears twice; give blocks distinct names")
                        seen.add(run_id)
                        if reason:
                            sweep.unsupported.append({"id": run_id, "reason": reason})
                            continue
                        shards = os.path.abspath(shards_tpl.format(split=split, block=name))
                        overrides = (f"model.fusion.name={fusion}", f"seed={int(seed)}",
                                     *for_modalities([*common, *extra], preset_balancing(config)[1]))
                        sweep.runs.append(RunSpec(run_id, name, preset, str(method), str(fusion), str(split), int(seed),
                                                  config, shards, overrides))
    return sweep


def run_status(folder: str) -> tuple[str, dict[str, Any] | None]:
    """A run's state and, when ``running``, the holder of its folder (pid, host, since, command).

    The one place that decides what the sweep does with a run: ``running`` (a live process
    holds the folder's lock, trainer/run_lock.py; not started: it is running elsewhere),
    ``done`` (a test evaluation exists), ``resume`` (a checkpoint exists) or ``new``.
    """
    if not os.path.isdir(folder):
        return "new", None
    held_by = holder(folder)
    if held_by is not None:
        return "running", held_by
    return _files_state(folder), None


def _files_state(folder: str) -> str:
    """``done``, ``resume`` or ``new`` from the run's files alone (the lock aside)."""
    if any(f.startswith("eval_") and f.endswith(".json") for f in os.listdir(folder)):
        return "done"
    return "resume" if os.path.exists(os.path.join(folder, "last.pt")) else "new"


def run_state(folder: str) -> str:
    """``running`` (held by a live process), ``done``, ``resume`` or ``new``: ``run_status``."""
    return run_status(folder)[0]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def elsewhere_text(held_by: dict[str, Any] | None) -> str:
    """``pid 123 on host h, since 2026-...Z: python cli.py train ...`` (what is known of it)."""
    return holder_text(held_by)


# Kept when a run killed before its first checkpoint is cleared: the lock file (deleting a lock
# file that another process may be opening would give two locks) and submitit's folder (the
# Slurm job now starting the run reads its own files there and writes its result there).
KEPT = (LOCK_NAME, "slurm")


def _clear_folder(folder: str) -> None:
    """Everything a run killed before its first checkpoint left, but ``KEPT``."""
    for name in os.listdir(folder):
        if name in KEPT:
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def train_command(spec: RunSpec, folder: str, resume: bool) -> list[str]:
    cmd = [sys.executable, CLI, "train", "--config", spec.config, "--shards", spec.shards, "--out", folder]
    for item in spec.overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def error_block(path: str, limit: int = 15) -> list[str]:
    """The end of a failed run's log that says why: from the last line that starts an error
    (``error:``, a refusal wrapped over several lines, or ``Traceback``) to the end, at most
    ``limit`` lines (a longer block keeps its first line and its end); the last 5 lines when
    there is neither (a process killed from outside)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [ln.rstrip() for ln in fh if ln.strip()]
    except OSError:
        return []
    starts = [i for i, ln in enumerate(lines) if ln.startswith(("error:", "Traceback"))]
    block = lines[starts[-1]:] if starts else lines[-5:]
    if len(block) > limit:
        block = [block[0], f"... ({len(block) - limit + 2} lines left out)", *block[len(block) - limit + 2:]]
    return block


def failure_reason(path: str) -> str:
    """Why a run failed, from its log: the whole ``error:`` paragraph (a message may span
    lines), else the last line (a traceback's exception)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [ln.rstrip() for ln in fh if ln.strip()]
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    if starts:
        return " ".join(ln.strip() for ln in lines[starts[-1]:])
    return lines[-1].strip() if lines else ""


def _test_accuracy(folder: str) -> float | None:
    names = sorted((n for n in os.listdir(folder) if n.startswith("eval_") and n.endswith(".json")),
                   key=lambda n: n != "eval_test.json")
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            return float(json.load(fh)["accuracy"])
    return None


def running_elsewhere(record: dict[str, Any], held_by: dict[str, Any] | None) -> dict[str, Any]:
    """The status record of a run that another live process is training: not started here."""
    return {**record, "status": "running", "elsewhere": dict(held_by or {})}


@dataclass
class RunTask:
    """One run for an engine to start (experiments/engines/): its ``cli.py train`` command as
    a new run's (``start_run`` adds ``--resume`` if the run has a last.pt at the moment it
    starts), what to set in the environment of the process that starts it, its folder and
    the description written to ``sweep_run.json``."""

    id: str
    folder: str
    argv: list[str]
    env: dict[str, str]
    describe: dict[str, Any]

    @property
    def log(self) -> str:
        return os.path.join(self.folder, "train.log")


@dataclass
class RunEnd:
    """How a run's start ended, as an engine reports it back: ``ran`` (train ran and exited
    with ``returncode``), ``done`` (finished before it started), ``elsewhere`` (another live
    process holds the folder: ``holder``), ``lost`` (the engine could not run it: ``error``)."""

    status: str
    returncode: int | None = None
    resumed: bool = False
    seconds: float = 0.0
    host: str = ""
    holder: dict[str, Any] | None = None
    error: str = ""


def run_task(spec: RunSpec, root: str, sets: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None) -> RunTask:
    """The task of one run: its train command plus an engine's own ``--set`` items (after the
    sweep's, so they win: ``train.device`` from ``--gpus-per-run``) and environment."""
    folder = spec.folder(root)
    argv = train_command(spec, folder, resume=False)
    for item in sets:
        argv += ["--set", item]
    return RunTask(spec.id, folder, argv, {"AVBALANCE_QUIET": "1", **(env or {})}, spec.describe())


def _kill_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the kernel SIGKILLs the child when the thread that started
    it dies (Linux's PR_SET_PDEATHSIG); None where there is no ``prctl``."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:  # in the child, between fork and exec
        prctl(1, kill)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(137)
    return preexec


def start_run(task: RunTask, started: Callable[[dict[str, Any]], None] | None = None,
              die_with_parent: bool = False) -> RunEnd:
    """Start (or resume, or skip) one run as a ``cli.py train`` process and wait for its end:
    the body of every engine's unit of work, run where the engine runs it (a thread of the
    sweep, a Ray worker, a Slurm job). Whether the run resumes is decided now, under the run
    folder's lock (``run_status``): a retried Ray task or a requeued Slurm job resumes from the
    last.pt its killed predecessor left; what a run killed before its first checkpoint left is
    cleared. A run finished or held by another live process meanwhile is not started.

    ``started`` gets the train process's pid, host, start time and whether it resumed.
    ``die_with_parent``: the train process dies with the process that started it (a Ray
    worker killed, alone or with its node), so that the retry finds the folder free."""
    folder = task.folder
    state, held_by = run_status(folder)
    if state == "running":
        return RunEnd("elsewhere", holder=held_by)
    if state == "done":
        return RunEnd("done")
    try:
        # Made ready under the folder's lock: a process that starts on it meanwhile is refused,
        # and one that took it since the check above is not disturbed (nor what it left).
        with hold_run_folder(folder):
            state = _files_state(folder)
            if state == "done":
                return RunEnd("done")
            if state == "new":
                _clear_folder(folder)  # killed before its first checkpoint: nothing worth keeping
            command = [*task.argv, *(["--resume"] if state == "resume" else [])]
            with open(os.path.join(folder, "sweep_run.json"), "w", encoding="utf-8") as fh:
                json.dump(task.describe, fh, indent=2)
            with open(task.log, "a", encoding="utf-8") as log:
                log.write(f"# {' '.join(command)}\n")
    except UserError:
        return RunEnd("elsewhere", holder=holder(folder))
    host, start = socket.gethostname(), time.perf_counter()
    preexec = _kill_with_parent() if die_with_parent else None
    with open(task.log, "a", encoding="utf-8") as log:
        with subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **task.env}, cwd=REPO,
                              preexec_fn=preexec) as proc:
            try:
                if started is not None:
                    started({"pid": proc.pid, "host": host, "since": _now(), "resumed": state == "resume"})
                code = proc.wait()
            except BaseException:  # as subprocess.call: no train left behind (a requeued Slurm job's exit too)
                proc.kill()
                raise
    return RunEnd("ran", returncode=code, resumed=state == "resume", seconds=time.perf_counter() - start, host=host)


def end_record(spec: RunSpec, root: str, end: RunEnd) -> dict[str, Any]:
    """A run's status record, from how its start ended and what its folder holds now."""
    folder = spec.folder(root)
    log_path = os.path.join(folder, "train.log")
    record: dict[str, Any] = {**spec.describe(), "folder": os.path.relpath(folder, root)}
    if end.status == "elsewhere":
        return running_elsewhere(record, end.holder)
    if end.status == "done":
        return {**record, "status": "done", "skipped": True, "accuracy": _test_accuracy(folder)}
    code = end.returncode
    if end.status == "ran":
        record.update(seconds=round(end.seconds, 1), resumed=end.resumed, returncode=code)
    after, held_by = run_status(folder)
    if after == "done" and code in (0, None):  # None: its train finished, the engine lost the answer
        return {**record, "status": "done", "accuracy": _test_accuracy(folder)}
    if after == "running" and code != 0:  # refused: another process took the folder before this run's train did
        return running_elsewhere(record, held_by)
    if end.status == "lost":
        lines = end.error.splitlines() or ["the engine could not run it"]
        return {**record, "status": "failed", "reason": lines[0], "log": log_path, "error": lines[:15]}
    return {**record, "status": "failed", "reason": failure_reason(log_path) or f"exit code {code}", "log": log_path,
            "error": error_block(log_path) or [f"exit code {code}"]}


def _write_status(root: str, sweep: Sweep, records: dict[str, dict]) -> None:
    doc = {"config": os.path.abspath(sweep.path), "runs": [records.get(s.id, {**s.describe(), "status": "pending"}) for s in sweep.runs],
           "unsupported": sweep.unsupported}
    tmp = os.path.join(root, "sweep.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    os.replace(tmp, os.path.join(root, "sweep.json"))


def progress_counts(specs: list[RunSpec], records: dict[str, dict]) -> dict[str, int]:
    """How many of ``specs`` are finished, running (here), running elsewhere, failed and waiting."""
    counts = dict.fromkeys(("finished", "running", "elsewhere", "failed", "waiting"), 0)
    for spec in specs:
        rec = records.get(spec.id, {})
        status = rec.get("status")
        key = {"done": "finished", "failed": "failed"}.get(status or "", "waiting")
        if status == "running":
            key = "elsewhere" if "elsewhere" in rec else "running"
        counts[key] += 1
    return counts


def progress_line(counts: dict[str, int], event: str = "") -> str:
    """``sweep: 3 finished, 2 running, 1 failed, 10 waiting (EVENT)``; runs held by other
    processes are counted apart when there are any."""
    elsewhere = f", {counts['elsewhere']} running elsewhere" if counts.get("elsewhere") else ""
    return (f"sweep: {counts['finished']} finished, {counts['running']} running{elsewhere}, {counts['failed']} failed, "
            f"{counts['waiting']} waiting" + (f" ({event})" if event else ""))


def _to_stderr(line: str) -> None:
    if not quiet():
        print(line, file=sys.stderr, flush=True)


def on_disk(sweep: Sweep) -> dict[str, dict]:
    """The records of the runs already finished, or held by another live process, now (reads only)."""
    records: dict[str, dict] = {}
    for spec in sweep.runs:
        state, held_by = run_status(spec.folder(sweep.out))
        if state == "done":
            records[spec.id] = {**spec.describe(), "folder": spec.id, "status": "done", "skipped": True,
                                "accuracy": _test_accuracy(spec.folder(sweep.out))}
        elif state == "running":  # looked at again at its turn: started then if it is free
            records[spec.id] = running_elsewhere({**spec.describe(), "folder": spec.id}, held_by)
    return records


def plan_tasks(sweep: Sweep, engine: SweepEngine, only: str | None = None) -> list[RunTask]:
    """The tasks ``engine`` would be given for the selected runs not finished yet (a dry run's)."""
    records = on_disk(sweep)
    return [run_task(s, sweep.out, engine.train_sets(), engine.run_env()) for s in selected(sweep, only)
            if records.get(s.id, {}).get("status") != "done"]


def run_sweep(sweep: Sweep, jobs: int | None = None, devices: list[str] | None = None, only: str | None = None,
              report: Callable[[str], None] = print, progress: Callable[[str], None] | None = None,
              engine: SweepEngine | None = None) -> dict[str, dict]:
    """Run every pending run of ``sweep`` on ``engine`` (experiments/engines/; default: the
    local engine, ``jobs`` at a time on ``devices``); the status record of each run.

    This decides what runs (the selection, finished, held elsewhere) and keeps ``sweep.json``;
    the engine only decides where each run's train process runs. ``report`` gets the sweep's
    plan and each run's result; ``progress`` (default: stderr, silent under AVBALANCE_QUIET) a
    count of the selected runs finished, running, failed and waiting each time a run starts or
    ends. A run held by another live process is not started (``status: running`` with
    ``elsewhere``, that process's pid, host, start and command). Nothing is written before the
    engine has started (and refused what it cannot run)."""
    from experiments.engines import EngineOptions, make_engine

    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if engine is None:
        engine = make_engine("local", EngineOptions(jobs=jobs, devices=tuple(devices or ())), sweep)
    progress = progress or _to_stderr
    specs = selected(sweep, only)
    root = sweep.out
    records = on_disk(sweep)
    todo = [s for s in specs if records.get(s.id, {}).get("status") != "done"]
    with engine:  # what it started (a local Ray runtime) is stopped at the end
        if todo:
            engine.start()
        os.makedirs(root, exist_ok=True)
        _write_status(root, sweep, records)
        held = sum(records.get(s.id, {}).get("status") == "running" for s in todo)
        chosen = f"{len(specs)} of {len(sweep.runs)} runs selected by --only {only!r}" if only is not None else f"{len(specs)} runs"
        report(f"sweep: {chosen} ({len(specs) - len(todo)} finished, {len(todo)} to run"
               f"{f', {held} of them running elsewhere now' if held else ''}), "
               f"{len(sweep.unsupported)} unsupported combinations left out; {engine.where()}; runs in {root}")
        for warning in missing_shards(todo):
            report(f"sweep: warning: {warning}")
        by_id = {s.id: s for s in todo}
        lock = threading.Lock()
        counter = iter(range(1, len(todo) + 1))

        def started(task: RunTask, info: dict[str, Any]) -> None:
            with lock:
                records[task.id] = {**task.describe, "folder": os.path.relpath(task.folder, root), "status": "running",
                                    **info, "log": task.log}
                _write_status(root, sweep, records)
                progress(progress_line(progress_counts(specs, records), f"started {task.id}"))

        def ended(task: RunTask, end: RunEnd) -> None:
            record = end_record(by_id[task.id], root, end)
            with lock:
                records[task.id] = record
                _write_status(root, sweep, records)
                n = next(counter)
                if record["status"] == "done":
                    detail = f"test accuracy {record['accuracy']:.3f}, {record.get('seconds', 0) / 60:.1f} min"
                    event = f"{task.id} finished"
                elif record["status"] == "running":
                    detail = f"running elsewhere ({elsewhere_text(record['elsewhere'])}); not started"
                    event = f"{task.id} running elsewhere"
                else:
                    detail = f"FAILED: {record['reason']} (log: {record['log']})"
                    event = f"{task.id} failed"
                report(f"sweep: [{n}/{len(todo)}] {task.id}: {detail}")
                progress(progress_line(progress_counts(specs, records), event))

        engine.run([run_task(s, root, engine.train_sets(), engine.run_env()) for s in todo], started, ended)
    return records


def final_lines(records: dict[str, dict]) -> list[str]:
    """After the summary: the runs left running elsewhere, and each failed run with the end of
    its log (the whole error, wrapped lines and traceback included), indented under its name."""
    lines: list[str] = []
    held = [r for r in records.values() if r.get("status") == "running" and "elsewhere" in r]
    if held:
        lines.append(f"sweep: {len(held)} run(s) not started, running elsewhere (run the sweep again once they end):")
        lines += [f"  {r['id']}: {elsewhere_text(r['elsewhere'])}" for r in held]
    failed = [r for r in records.values() if r.get("status") == "failed"]
    if failed:
        lines.append(f"sweep: {len(failed)} failed run(s), with the end of each log:")
        for r in failed:
            lines.append(f"  {r['id']} (log: {r.get('log', '?')})")
            lines += [f"      {ln}" for ln in r.get("error") or [r.get("reason", "")]]
    return lines


def selected(sweep: Sweep, only: str | None) -> list[RunSpec]:
    """The runs ``--only GLOB[,GLOB...]`` keeps: those whose id matches any of the globs (all without it)."""
    globs = [g.strip() for g in only.split(",") if g.strip()] if only is not None else []
    specs = [s for s in sweep.runs if only is None or any(fnmatch.fnmatch(s.id, g) for g in globs)]
    if only is not None and not specs:
        raise UserError(f"--only {only!r} matches none of the {len(sweep.runs)} runs")
    return specs


def missing_shards(specs: list[RunSpec]) -> list[str]:
    """One warning per shard set the runs name that holds no shards.json (those runs would fail)."""
    missing: dict[str, int] = {}
    for s in specs:
        if not os.path.exists(os.path.join(s.shards, "shards.json")):
            missing[s.shards] = missing.get(s.shards, 0) + 1
    return [f"{n} run(s) read {path}, which holds no shards.json: run `{prog()} preprocess` for that split first"
            for path, n in missing.items()]


def plan_lines(sweep: Sweep, only: str | None = None) -> tuple[list[str], list[str]]:
    """A dry run: the selected runs with the state each is in, then the unsupported
    combinations; and warnings (shard sets that do not exist yet)."""
    specs = selected(sweep, only)
    lines = []
    for s in specs:
        state, held_by = run_status(s.folder(sweep.out))
        where = f"; running elsewhere: {elsewhere_text(held_by)}" if state == "running" else ""
        lines.append(f"{state:7s} {s.id}  ({os.path.relpath(s.config, REPO)}, {s.shards}{where})")
    lines += [f"skip    {u['id']}  ({u['reason']})" for u in sweep.unsupported]
    return lines, missing_shards(specs)


