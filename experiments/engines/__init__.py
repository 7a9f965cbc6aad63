"""Sweep engines by name: where each run's ``cli.py train`` process runs (``sweep --engine
local|ray|slurm``). experiments/sweep.py decides what runs, for every engine."""

from experiments.engines.base import SWEEP_ENGINES, EngineOptions, SweepEngine, make_engine
from experiments.engines import local as _local  # noqa: F401  (registers "local")
from experiments.engines import ray as _ray  # noqa: F401  (registers "ray"; imports ray only when used)
from experiments.engines import slurm as _slurm  # noqa: F401  (registers "slurm"; imports submitit only when used)

__all__ = ["SWEEP_ENGINES", "EngineOptions", "SweepEngine", "make_engine"]
