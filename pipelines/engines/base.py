"""The engine contract. The runner plans, records failures and packs; an engine only decides
where the work runs, so every engine writes the same cache, status and shards."""

from __future__ import annotations

from typing import Any, Callable

from avbalance.registry import Registry
from pipelines.config import PreprocessConfig
from pipelines.worker import ClipJob, ClipOutcome

ENGINES: Registry[type["Engine"]] = Registry("engine")


class Engine:
    """Runs chunks of clip jobs and maps pack tasks. A context manager: the runtime it needs
    (a process pool, a Ray connection) is started on first use and released on exit."""

    name = "base"

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def check(cls, cfg: PreprocessConfig) -> None:
        """Refuse a config this engine cannot run, before any work (raise UserError)."""

    def close(self) -> None:
        """Release the runtime (no-op when it was never started)."""

    def run_chunks(self, chunks: list[list[ClipJob]], on_done: Callable[[list[ClipOutcome]], None]) -> list[str]:
        """Run every chunk (``worker.process_chunk``), calling ``on_done`` with each chunk's
        outcomes as it finishes, once per chunk; return the ids of clips whose chunk could not
        be run (its worker died past every retry), for the runner to report."""
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: list, on_done: Callable[[], None] | None = None) -> list:
        """``[fn(item) for item in items]``, perhaps in parallel; results in item order."""
        raise NotImplementedError


def make_engine(cfg: PreprocessConfig) -> Engine:
    return ENGINES.get(cfg.engine)(cfg)


def check_engine(cfg: PreprocessConfig) -> None:
    ENGINES.get(cfg.engine).check(cfg)
