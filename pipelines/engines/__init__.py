"""Preprocessing engines by name: where the runner's work runs (``--engine local|ray``)."""

from pipelines.engines.base import ENGINES, Engine, check_engine, make_engine
from pipelines.engines import local as _local  # noqa: F401  (registers "local")
from pipelines.engines import ray as _ray  # noqa: F401  (registers "ray"; imports ray only when used)

__all__ = ["ENGINES", "Engine", "check_engine", "make_engine"]
