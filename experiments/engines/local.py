"""The local engine (``sweep --engine local``, the default): each run a subprocess of this
machine, ``--jobs`` at a time, threads split between them, ``--devices`` one GPU per slot."""

from __future__ import annotations

import concurrent.futures
import os
import queue
from dataclasses import replace

from experiments.engines.base import SWEEP_ENGINES, Ended, Started, SweepEngine
from experiments.sweep import RunTask, start_run


def slot_env(jobs: int, slot: int, devices: tuple[str, ...] | list[str]) -> dict[str, str]:
    """What one slot's runs get in their environment: threads split between parallel runs
    (unless OMP_NUM_THREADS is set), the slot's GPU."""
    env: dict[str, str] = {}
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    return env


@SWEEP_ENGINES.register("local")
class LocalEngine(SweepEngine):

    @property
    def jobs(self) -> int:
        return self.options.jobs or 1

    def where(self) -> str:
        return f"{self.jobs} at a time"

    def run(self, tasks: list[RunTask], started: Started, ended: Ended) -> None:
        slots: queue.Queue[int] = queue.Queue()
        for i in range(self.jobs):
            slots.put(i)

        def one(task: RunTask) -> None:
            slot = slots.get()
            try:
                placed = replace(task, env={**task.env, **slot_env(self.jobs, slot, self.options.devices)})
                end = start_run(placed, started=lambda info: started(task, info))
            finally:
                slots.put(slot)
            ended(task, end)

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for future in [pool.submit(one, t) for t in tasks]:
                future.result()
