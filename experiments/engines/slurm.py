"""The Slurm engine (``sweep --engine slurm``), through submitit: one Slurm job per run, with
``--cpus-per-run`` CPUs, ``--gpus-per-run`` GPUs, ``--slurm-partition`` and ``--slurm-time``;
submitit's files (the sbatch script, the job's stdout and stderr, its pickles) in
``<run folder>/slurm/``. A job runs ``start_run`` on its run: resume is decided when the job
starts, and a job that reaches its time limit is requeued by submitit (``TrainJob.checkpoint``)
and resumes from the run's last.pt. Run it on the cluster's login node, from a checkout, venv,
shard sets and output folder on the shared file system; the command waits for the jobs and
keeps sweep.json and the progress lines up to date (stopped, the submitted jobs go on, and the
same command run again picks up: a run whose folder a job holds is not started twice).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from avbalance.errors import UserError
from experiments.engines.base import SWEEP_ENGINES, Ended, EngineOptions, Started, SweepEngine, commands, notice_started
from experiments.engines.ray import device_sets, threads_env
from experiments.sweep import REPO, RunEnd, RunTask, start_run

# For tests only: AVBALANCE_SLURM_CLUSTER=local sends the very same submissions to submitit's
# LocalExecutor (jobs as processes of this machine, no Slurm needed). Unset: a real Slurm cluster.
CLUSTER_ENV = "AVBALANCE_SLURM_CLUSTER"
POLL_S = 2.0  # how often the driver looks at its jobs (a finished job's result is a file in its folder)
LOCAL_TIMEOUT_MIN = 24 * 60  # the local executor's time limit without --slurm-time (its own default is 2 min)


class TrainJob:
    """What a Slurm job runs: ``start_run`` of one run. ``checkpoint`` makes submitit requeue
    the job when it reaches its time limit (its train process is killed with it); the requeued
    job resumes from the run's last.pt."""

    def __init__(self, task: RunTask) -> None:
        self.task = task

    def __call__(self) -> RunEnd:
        return start_run(self.task, die_with_parent=True)

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def cluster() -> str:
    """``slurm``, or what CLUSTER_ENV says (tests: ``local``)."""
    return os.environ.get(CLUSTER_ENV) or "slurm"


@SWEEP_ENGINES.register("slurm")
class SlurmEngine(SweepEngine):

    def __init__(self, options: EngineOptions) -> None:
        super().__init__(options)
        self.cluster = cluster()

    def parameters(self) -> dict[str, Any]:
        """The submitit parameters of every job (submitit's names; ``slurm_*`` go to sbatch as they are)."""
        params: dict[str, Any] = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": self.cpus}
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.options.slurm_time:
            params["timeout_min"] = self.options.slurm_time
        elif self.cluster == "local":
            params["timeout_min"] = LOCAL_TIMEOUT_MIN
        if self.options.slurm_partition:
            params["slurm_partition"] = self.options.slurm_partition
        # Jobs import this checkout's code, whatever the directory they start in.
        params[f"{self.cluster}_setup"] = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"]
        return params

    def where(self) -> str:
        partition = f"partition {self.options.slurm_partition}" if self.options.slurm_partition else "the default partition"
        limit = f"{self.options.slurm_time} min" if self.options.slurm_time else "the partition's time limit"
        local = " (submitit's local executor)" if self.cluster == "local" else ""
        return (f"one Slurm job per run{local} ({self.cpus} CPU{'s' if self.cpus > 1 else ''} and {self.gpus} "
                f"GPU{'s' if self.gpus != 1 else ''} per run, {partition}, {limit}; submitit's logs in <run folder>/slurm/)")

    def train_sets(self) -> list[str]:
        return device_sets(self.gpus)

    def run_env(self) -> dict[str, str]:
        return threads_env(self.cpus)

    def start(self) -> None:
        if self.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
            raise UserError("--engine slurm: there is no Slurm here (sbatch and srun are not on PATH); run the sweep on "
                            "the cluster's login node, or add --dry-run to see what would be submitted")

    def plan(self, tasks: list[RunTask]) -> list[str]:
        return [f"slurm: would submit {len(tasks)} job(s), {self.where()}, with submitit's parameters "
                f"{json.dumps(self.parameters(), sort_keys=True)}:", *commands(tasks)]

    def _submit(self, task: RunTask) -> Any:
        import submitit

        executor = submitit.AutoExecutor(folder=os.path.join(task.folder, "slurm"), cluster=self.cluster)
        executor.update_parameters(name=f"avbalance:{task.id}", **self.parameters())
        return executor.submit(TrainJob(task))

    def run(self, tasks: list[RunTask], started: Started, ended: Ended) -> None:
        self.start()
        pending: list[tuple[Any, RunTask]] = []
        for task in tasks:
            try:
                pending.append((self._submit(task), task))
            except Exception as err:  # noqa: BLE001 -- sbatch's refusal (a bad partition, a limit): that run fails, the others go on
                ended(task, RunEnd("lost", error=f"the job was not submitted ({type(err).__name__}: {_first_line(err)})"))
        seen: dict[str, int] = {}
        while pending:
            still: list[tuple[Any, RunTask]] = []
            for job, task in pending:
                if job.done():
                    ended(task, _outcome(job))
                else:
                    still.append((job, task))
            pending = still
            notice_started([t for _, t in pending], seen, started)
            if pending:
                time.sleep(POLL_S)


def _outcome(job: Any) -> RunEnd:
    """A finished job's RunEnd, or a ``lost`` one naming the job and its logs."""
    try:
        return job.result()
    except Exception as err:  # noqa: BLE001 -- submitit's UncompletedJobError, FailedJobError: the job died
        tail = []
        try:
            with open(job.paths.stderr, encoding="utf-8", errors="replace") as fh:
                tail = [ln.rstrip() for ln in fh if ln.strip()][-5:]
        except OSError:
            pass
        return RunEnd("lost", error="\n".join([f"the Slurm job {job.job_id} ended without a result ({_first_line(err)}); "
                                               f"its logs: {job.paths.stdout}, {job.paths.stderr}", *tail]))


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__
