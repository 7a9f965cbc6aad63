"""The Ray engine (``--engine ray``): the runner's chunks and pack tasks on a Ray cluster.

Chunks without work for a heavy stage (one that runs neural networks, ``Stage.heavy``: faces,
face_features) run as Ray tasks, retried on another worker when theirs dies (a chunk's
outputs are cached under their keys, so a retry rewrites the same files and no clip is
counted twice). Chunks with such work go to a pool of actors, one model load (MTCNN,
EfficientNet) per actor, batches across the clips of a chunk; a dead actor is restarted and
its chunk retried. Pack runs one task per output shard. Every task and actor gets the run's
stage classes with its work (``stages.base.adopt``), so a stage registered only in the driver
runs on the cluster too. Without ``--ray-address`` a local runtime of ``--workers`` CPUs is
started and shut down at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from avbalance.errors import UserError
from avbalance.progress import quiet
from pipelines.engines.base import ENGINES, Engine
from pipelines.stages.base import adopt, shipped
from pipelines.worker import ClipJob, ClipOutcome, export_models, init_worker, process_chunk, warm_up

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RETRIES = 3  # per task and per actor restart; past them the clips are reported as lost
LOCAL_START_ATTEMPTS = 3  # Ray gives its raylet 30 s to register: a busy machine can miss that
OBJECT_STORE_BYTES = 256 * 1024**2  # chunks pass paths and small outcomes, never arrays
# AVBALANCE_CACHE_DIR / XDG_CACHE_HOME: where the face actors find (or export) the ONNX networks.
PASSED_ENV = ("AVBALANCE_QUIET", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
              "AVBALANCE_CACHE_DIR", "XDG_CACHE_HOME")


_READY: list = []  # the config this worker process was initialised with


def _chunk_task(cfg, jobs: list[ClipJob], stages: tuple = ()) -> list[ClipOutcome]:
    adopt(stages)
    # A Ray worker runs many chunks: initialise it once per config, not per chunk.
    if _READY != [cfg]:
        init_worker(cfg, threads=1)  # one CPU per task: never more threads than the task holds
        _READY[:] = [cfg]
    return process_chunk(jobs)


class _FaceWorker:
    """One model load per actor; every chunk it runs batches face frames across its clips."""

    def __init__(self, cfg, stages: tuple = ()) -> None:
        adopt(stages)
        warm_up(cfg)
        init_worker(cfg, threads=1)

    def run(self, jobs: list[ClipJob]) -> list[ClipOutcome]:
        return process_chunk(jobs)


def _call(fn: Callable[[Any], Any], item: Any, stages: tuple = ()) -> Any:
    adopt(stages)
    return fn(item)


@ENGINES.register("ray")
class RayEngine(Engine):

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._ray = None
        self._temp_dir: str | None = None
        self._stages = shipped(cfg.stages)  # sent with every task: the workers' registry may lack some
        self._heavy = {name for name, stage in self._stages if stage.heavy}

    def _start(self):
        """Connect on first use (a re-run with nothing to do starts no runtime)."""
        if self._ray is not None:
            return self._ray
        address = self.cfg.ray_address
        ray, self._temp_dir = start_ray(address, num_cpus=self.cfg.workers)
        self._ray = ray
        print(describe_cluster(ray, address), file=sys.stderr, flush=True)  # say where the work runs
        return ray

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.ray_address:
            _check_reachable(cfg.ray_address)

    def close(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None
        self._cleanup_temp()

    def _cleanup_temp(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)  # session logs and sockets
            self._temp_dir = None

    def _face_actors(self, ray, n: int) -> list:
        # The ONNX export once here rather than racing in every actor: a local runtime's actors
        # (and a cluster's nodes that share the cache folder) then only load the files.
        export_models(self.cfg)
        gpus = 0.0
        if self.cfg.device == "cuda":
            total = ray.cluster_resources().get("GPU", 0)
            if not total:
                raise UserError("--device cuda was asked for, but the Ray cluster has no GPU; "
                                "start GPU nodes (`ray start --num-gpus N`) or use --device cpu")
            gpus = min(1.0, total / n)
        actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=RETRIES, max_task_retries=RETRIES)(_FaceWorker)
        return [actor.remote(self.cfg, self._stages) for _ in range(n)]

    def run_chunks(self, chunks: list[list[ClipJob]], on_done: Callable[[list[ClipOutcome]], None]) -> list[str]:
        ray = self._start()
        cfg_ref, stages_ref = ray.put(self.cfg), ray.put(self._stages)
        task = ray.remote(num_cpus=1, max_retries=RETRIES)(_chunk_task)
        face = [c for c in chunks if any(s in self._heavy for job in c for s in job.todo)]
        pending = {task.remote(cfg_ref, c, stages_ref): (c, None) for c in chunks
                   if not any(s in self._heavy for job in c for s in job.todo)}
        actors = self._face_actors(ray, min(self.cfg.workers, len(face))) if face else []
        for actor in actors:  # one chunk in flight per actor; the next goes to whichever is free
            if face:
                chunk = face.pop(0)
                pending[actor.run.remote(chunk)] = (chunk, actor)
        lost: list[str] = []
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                chunk, actor = pending.pop(ref)
                try:
                    on_done(ray.get(ref))
                except ray.exceptions.RayError as err:
                    _raise_user_error(err)
                    lost += [job.clip_id for job in chunk]  # its worker died past every retry
                if actor is not None and face:
                    chunk = face.pop(0)
                    pending[actor.run.remote(chunk)] = (chunk, actor)
        finally:
            for actor in actors:
                ray.kill(actor)
        return lost + [job.clip_id for c in face for job in c]

    def map(self, fn: Callable[[Any], Any], items: list, on_done: Callable[[], None] | None = None) -> list:
        ray = self._start()
        task = ray.remote(num_cpus=1, max_retries=RETRIES)(_call)
        stages_ref = ray.put(self._stages)
        order = {task.remote(fn, item, stages_ref): i for i, item in enumerate(items)}
        results: list = [None] * len(items)
        pending = list(order)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[order[ref]] = ray.get(ref)
            except ray.exceptions.RayError as err:
                _raise_user_error(err)
                raise UserError(f"a Ray task failed past {RETRIES} retries ({type(err).__name__}); re-run the "
                                "same command: finished work is cached") from None
            if on_done:
                on_done()
        return results


def describe_cluster(ray, address: str | None) -> str:
    """One line: which Ray the run uses, its nodes and CPUs (and GPUs)."""
    where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        if address:
            where += f" ({ray.get_runtime_context().gcs_address})"
    except Exception:  # noqa: BLE001 -- the line is information; the run does not depend on it
        nodes, total = [], {}
    gpus = f", {int(total['GPU'])} GPUs" if total.get("GPU") else ""
    return f"ray: running on {where}: {len(nodes)} node(s), {int(total.get('CPU', 0))} CPUs{gpus}"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address where no cluster answers (``ray.init`` retries for minutes)."""
    if address.startswith("ray://"):
        return  # Ray Client: its own connection timeout applies
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            resolved = canonicalize_bootstrap_address("auto")
        except Exception:  # noqa: BLE001 -- a private helper: without it, ray.init decides
            return
        if resolved is None:
            raise UserError("--ray-address auto found no running Ray cluster on this machine; start one with "
                            "`ray start --head`, give HOST:PORT, or omit --ray-address for a local runtime")
        address = resolved
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address}: expected auto or HOST:PORT (the head node's GCS port, 6379 by default)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({err}); start the head node with "
                        f"`ray start --head --port {port}`, or omit --ray-address for a local runtime") from None


def start_ray(address: str | None, num_cpus: int | None, local_env: dict[str, str] | None = None) -> tuple[Any, str | None]:
    """Connect to the Ray cluster at ``address``, or start a local runtime of ``num_cpus`` CPUs
    (retried: a node may time out starting on a loaded machine), with this checkout's code and
    environment in every worker; ``local_env`` is added to a local runtime's environment only.
    Returns the ``ray`` module and the local runtime's temp folder (None on a cluster), which
    the caller removes after ``ray.shutdown()``. A failure is one ``UserError`` saying what to do."""
    import ray

    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    # Workers import this checkout's code, whatever the cluster's working directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    common = dict(logging_level=logging.WARNING,
                  log_to_driver=not quiet())  # worker warnings reach the user, not tests' output
    failure: Exception | None = None
    temp_dir: str | None = None
    for _ in range(1 if address else LOCAL_START_ATTEMPTS):
        try:
            if address:  # a cluster's workers get the environment through the job's runtime_env
                ray.init(address=address, runtime_env={"env_vars": env}, **common)
            else:
                # A local runtime's workers inherit it from the raylet, started here: with a
                # runtime_env, Ray could not use the workers it prestarts and started new ones
                # after the first task (seconds of imports on 2 cores).
                # address="local": a RAY_ADDRESS in the environment must not redirect the run.
                temp_dir = tempfile.mkdtemp(prefix="avb-ray-")
                with _environ({**env, **(local_env or {})}):
                    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                             object_store_memory=OBJECT_STORE_BYTES, _temp_dir=temp_dir, **common)
            return ray, temp_dir
        except Exception as err:  # Ray raises bare Exceptions too (a node that timed out starting)
            ray.shutdown()  # stop whatever part of a local runtime did start
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
                temp_dir = None
            failure = err
    where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
    if address and "AuthToken" in str(failure) and os.environ.get("RAY_AUTH_MODE") != "token":
        # Ray 2.60's `ray start --head` turns token authentication on; a driver sends the
        # token (~/.ray/auth_token) only in token mode.
        raise UserError(f"--engine ray: the Ray cluster at {address} refused this driver's credentials "
                        f"({type(failure).__name__}: {failure}); it uses token authentication: run with "
                        "RAY_AUTH_MODE=token in the environment (the token is read from ~/.ray/auth_token, or "
                        "RAY_AUTH_TOKEN) and try again")
    raise UserError(f"--engine ray could not start or reach {where} ({type(failure).__name__}: {failure}); "
                    "start a cluster with `ray start --head` and pass --ray-address HOST:PORT (or auto), "
                    "or omit --ray-address for a local runtime (on an overloaded machine, try again)")

@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment for the block (what it starts inherits it)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _raise_user_error(err: Exception) -> None:
    """A UserError raised inside a task is the user's message, not a Ray traceback."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, UserError):
        raise cause from None

