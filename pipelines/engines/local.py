"""The local engine: chunks in-process (one worker) or on a fork pool of ``--workers``."""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any, Callable

from pipelines.engines.base import ENGINES, Engine
from pipelines.worker import ClipJob, ClipOutcome, init_worker, process_chunk, warm_up


@ENGINES.register("local")
class LocalEngine(Engine):

    def run_chunks(self, chunks: list[list[ClipJob]], on_done: Callable[[list[ClipOutcome]], None]) -> list[str]:
        cfg = self.cfg
        cores = os.cpu_count() or 1
        warm_up(cfg)
        if cfg.workers <= 1:
            init_worker(cfg, threads=cores)
            for chunk in chunks:
                on_done(process_chunk(chunk))
            return []
        ctx = mp.get_context("fork")
        with ctx.Pool(cfg.workers, initializer=init_worker, initargs=(cfg, max(1, cores // cfg.workers))) as pool:
            for outcomes in pool.imap_unordered(process_chunk, chunks):
                on_done(outcomes)
        return []  # a pool worker that dies takes the run with it; a re-run resumes from the cache

    def map(self, fn: Callable[[Any], Any], items: list, on_done: Callable[[], None] | None = None) -> list:
        results = []
        if self.cfg.workers <= 1 or len(items) <= 1:
            for item in items:
                results.append(fn(item))
                if on_done:
                    on_done()
            return results
        with mp.get_context("fork").Pool(min(self.cfg.workers, len(items))) as pool:
            for result in pool.imap(fn, items):
                results.append(result)
                if on_done:
                    on_done()
        return results
