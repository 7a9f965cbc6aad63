"""The sweep engine contract. experiments/sweep.py decides what runs (the grid, ``--only``,
finished, resumed, new, running elsewhere) and keeps sweep.json; an engine only decides where
each run's train process runs: it gets the runs to start (``RunTask``: the train command, its
environment, folder and log), runs ``start_run`` on each where it runs its work, and reports
each run's start and end (``RunEnd``) back, so every engine writes the same run folders."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Callable

from avbalance.errors import UserError
from avbalance.registry import Registry
from experiments.sweep import RunEnd, RunTask, Sweep
from trainer.run_lock import holder

SWEEP_ENGINES: Registry[type["SweepEngine"]] = Registry("sweep engine")
Started = Callable[[RunTask, dict[str, Any]], None]
Ended = Callable[[RunTask, RunEnd], None]


@dataclass(frozen=True)
class EngineOptions:
    """The ``sweep`` options that say where runs go; None: not given (the engine's default)."""

    jobs: int | None = None
    devices: tuple[str, ...] = ()
    cpus_per_run: int | None = None
    gpus_per_run: int | None = None
    ray_address: str | None = None
    slurm_partition: str | None = None
    slurm_time: int | None = None


# Each option, its flag, and the engines that take it: the others refuse it rather than ignore it.
OPTION_ENGINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "jobs": ("--jobs", ("local", "ray")),
    "devices": ("--devices", ("local",)),
    "cpus_per_run": ("--cpus-per-run", ("ray", "slurm")),
    "gpus_per_run": ("--gpus-per-run", ("ray", "slurm")),
    "ray_address": ("--ray-address", ("ray",)),
    "slurm_partition": ("--slurm-partition", ("slurm",)),
    "slurm_time": ("--slurm-time", ("slurm",)),
}


class SweepEngine:
    """Starts runs where it runs its work and reports back. A context manager: what ``start``
    started (a local Ray runtime) is released on exit."""

    name = "base"

    def __init__(self, options: EngineOptions) -> None:
        self.options = options

    @property
    def cpus(self) -> int:
        """CPUs each run holds (``--cpus-per-run``, default 1)."""
        return self.options.cpus_per_run or 1

    @property
    def gpus(self) -> int:
        """GPUs each run holds (``--gpus-per-run``, default 0)."""
        return self.options.gpus_per_run or 0

    def __enter__(self) -> "SweepEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def check_options(cls, options: EngineOptions) -> None:
        """Refuse the options of other engines (UserError); the flags alone, before the sweep file is read."""
        for key, (flag, engines) in OPTION_ENGINES.items():
            if cls.name not in engines and getattr(options, key) not in (None, ()):
                raise UserError(f"{flag} is for --engine {' or '.join(engines)}, not {cls.name}; "
                                f"add --engine {engines[0]} or drop {flag}")

    @classmethod
    def check(cls, options: EngineOptions, sweep: Sweep) -> None:
        """Refuse, before anything is written, what this engine cannot do with ``sweep`` (UserError)."""

    def start(self) -> None:
        """Connect to where runs go and refuse what it cannot run (UserError); called only when
        there is a run to start, before the sweep writes anything."""

    def close(self) -> None:
        """Release what ``start`` started (no-op when nothing was)."""

    def where(self) -> str:
        """Where the runs go, for the sweep's first line: ``2 at a time``."""
        raise NotImplementedError

    def train_sets(self) -> list[str]:
        """``--set`` items this engine adds to every run's train command (after the sweep's)."""
        return []

    def run_env(self) -> dict[str, str]:
        """Environment variables this engine sets for every run's train process."""
        return {}

    def plan(self, tasks: list[RunTask]) -> list[str]:
        """A dry run's lines: what would be started or submitted, and how (nothing is)."""
        return []

    def run(self, tasks: list[RunTask], started: Started, ended: Ended) -> None:
        """Run ``start_run`` on every task; call ``started`` when a run's train process starts
        (as soon as the engine can tell) and ``ended`` once per task when its start ended."""
        raise NotImplementedError


def make_engine(name: str, options: EngineOptions, sweep: Sweep) -> SweepEngine:
    """The engine ``name`` for these options, or the UserError that refuses them."""
    cls = SWEEP_ENGINES.get(name)
    cls.check_options(options)
    cls.check(options, sweep)
    return cls(options)


def commands(tasks: list[RunTask]) -> list[str]:
    """A dry run's view of each run: its id and train command (``--resume`` is added when the
    run has a last.pt at the moment it starts)."""
    return ["  (each run's train command; --resume is added if the run has a last.pt when it starts)",
            *(f"  {t.id}: {shlex.join(t.argv)}" for t in tasks)]


def _train_of(task: RunTask, held_by: dict[str, Any] | None) -> list[str] | None:
    """The command line of the lock holder when it is a train of this run (not the worker
    that readies the folder a moment before), else None."""
    try:
        words = shlex.split(str((held_by or {}).get("command", "")))
    except ValueError:
        return None
    return words if "train" in words and task.folder in words else None


def notice_started(tasks: list[RunTask], seen: dict[str, int], started: Started) -> None:
    """For engines that cannot call back from where a run starts (a Ray worker, a Slurm job):
    a run has started when its train process holds its folder's lock (trainer/run_lock.py, on
    the shared file system). Reports each train process once (a retried run's new one again)."""
    for task in tasks:
        held_by = holder(task.folder)
        words = _train_of(task, held_by)
        if words is None or held_by is None or seen.get(task.id) == held_by.get("pid"):
            continue
        seen[task.id] = held_by.get("pid", -1)
        started(task, {"pid": held_by.get("pid"), "host": held_by.get("host", "?"), "since": held_by.get("since", "?"),
                       "resumed": "--resume" in words})
