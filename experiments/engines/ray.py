"""The Ray engine (``sweep --engine ray``): each run a Ray task with the CPUs and GPUs it asks
for (``--cpus-per-run``, ``--gpus-per-run``), whose body runs the run's train process and
returns how it ended. A task whose worker or node dies is retried (``RETRIES``); the retry
decides resume at its start (``start_run``), so it continues from the run's last.pt. The
train process dies with its worker (PR_SET_PDEATHSIG), so the retry finds the folder free.

Without ``--ray-address`` a local runtime is started (sized ``--jobs`` x ``--cpus-per-run``
CPUs, else every CPU) and shut down at the end, as preprocessing's Ray engine does
(pipelines/engines/ray.py: the same start-up, environment and refusals). On a cluster the run
folders, the shard sets and this checkout with its Python must be at the same paths on every
node (a shared file system): a relative output folder is refused.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from avbalance.errors import UserError
from experiments.engines.base import SWEEP_ENGINES, Ended, EngineOptions, Started, SweepEngine, commands, notice_started
from experiments.sweep import RunEnd, RunTask, Sweep, start_run
from pipelines.engines.ray import _check_reachable, describe_cluster, start_ray

RETRIES = 3  # a task whose worker or node died is started again this many times
POLL_S = 1.0  # how often the driver looks for runs that started (their folder's lock)


def _run(task: RunTask) -> RunEnd:
    """A Ray task's body: the run, resumed if a killed attempt left a last.pt."""
    return start_run(task, die_with_parent=True)


def device_sets(gpus: int) -> list[str]:
    """A run's ``train.device`` follows the GPUs it was given."""
    return [f"train.device={'cuda' if gpus > 0 else 'cpu'}"]


def threads_env(cpus: int) -> dict[str, str]:
    """A run's threads: the CPUs it holds (OMP_NUM_THREADS of the sweep's environment wins)."""
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(cpus)}


@SWEEP_ENGINES.register("ray")
class RayEngine(SweepEngine):

    def __init__(self, options: EngineOptions) -> None:
        super().__init__(options)
        self._ray: Any = None
        self._temp_dir: str | None = None
        self._cluster = ""

    @classmethod
    def check_options(cls, options: EngineOptions) -> None:
        super().check_options(options)
        if options.ray_address and options.jobs is not None:
            raise UserError("--jobs sizes a local Ray runtime; a Ray cluster (--ray-address) runs as many runs at "
                            "once as its CPUs and GPUs allow: drop --jobs")

    @classmethod
    def check(cls, options: EngineOptions, sweep: Sweep) -> None:
        if options.ray_address:
            if sweep.out_written and not os.path.isabs(sweep.out_written):
                raise UserError(f"{sweep.out_given} is a relative path; with --ray-address the run folders must be on a "
                                "path every node of the cluster sees (a shared file system): pass an absolute --out "
                                "there, e.g. --out /shared/runs/NAME")
            _check_reachable(options.ray_address)

    def where(self) -> str:
        per_run = f"{self.cpus} CPU{'s' if self.cpus > 1 else ''} and {self.gpus} GPU{'s' if self.gpus != 1 else ''} per run"
        return f"Ray tasks ({per_run}, retried {RETRIES} times) on {self._cluster or self._place()}"

    def _place(self) -> str:
        if self.options.ray_address:
            return f"the Ray cluster at {self.options.ray_address}"
        size = f"{self.options.jobs * self.cpus} CPUs" if self.options.jobs else "every CPU"
        return f"a local Ray runtime ({size})"

    def train_sets(self) -> list[str]:
        return device_sets(self.gpus)

    def run_env(self) -> dict[str, str]:
        return threads_env(self.cpus)

    def start(self) -> None:
        """Start a local runtime or connect to the cluster; refuse runs no node can hold."""
        if self._ray is not None:
            return
        address = self.options.ray_address
        num_cpus = self.options.jobs * self.cpus if self.options.jobs else None
        # Ray starts its workers at niceness 15 (its worker_niceness), and a run's train process
        # inherits it: on a machine shared with other work the runs would get what is left of the
        # CPUs (measured: 10x slower beside two nice-5 jobs). A cluster's own setting is its operator's.
        niceness = {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0")}
        ray, self._temp_dir = start_ray(address, num_cpus, local_env=niceness)
        self._ray = ray
        try:
            self._check_resources(ray, address)
        except UserError:
            self.close()
            raise
        self._cluster = describe_cluster(ray, address).removeprefix("ray: running on ")

    def _check_resources(self, ray: Any, address: str | None) -> None:
        """Refuse runs that no node can hold (Ray would leave them waiting for ever)."""
        where = f"the Ray cluster at {address}" if address else "the local Ray runtime (this machine)"
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        most = {key: max((n.get(key, 0) for n in nodes), default=0) for key in ("CPU", "GPU")}
        if self.gpus and not ray.cluster_resources().get("GPU"):
            raise UserError(f"--gpus-per-run {self.gpus}: {where} has no GPU; start GPU nodes (`ray start --num-gpus N`), "
                            "or use --gpus-per-run 0 to train on CPUs")
        if self.gpus > most["GPU"]:
            raise UserError(f"--gpus-per-run {self.gpus}: no node of {where} has that many GPUs (the most is "
                            f"{int(most['GPU'])}); ask for at most {int(most['GPU'])}")
        if self.cpus > most["CPU"]:
            raise UserError(f"--cpus-per-run {self.cpus}: no node of {where} has that many CPUs (the most is "
                            f"{int(most['CPU'])}); ask for at most {int(most['CPU'])}")

    def close(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None
        self._cleanup_temp()

    def _cleanup_temp(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)  # session logs and sockets
            self._temp_dir = None

    def plan(self, tasks: list[RunTask]) -> list[str]:
        return [f"ray: would start {len(tasks)} task(s) as {self.where()}:", *commands(tasks)]

    def run(self, tasks: list[RunTask], started: Started, ended: Ended) -> None:
        self.start()
        ray = self._ray
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=RETRIES)(_run)
        pending = {remote.remote(t): t for t in tasks}
        seen: dict[str, int] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in done:
                task = pending.pop(ref)
                try:
                    end = ray.get(ref)
                except ray.exceptions.RayError as err:  # past every retry, or its body raised
                    end = RunEnd("lost", error=f"the Ray task failed ({type(err).__name__}, after up to {RETRIES} "
                                               f"retries): {_last_line(err)}")
                ended(task, end)
            notice_started(list(pending.values()), seen, started)


def _last_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
