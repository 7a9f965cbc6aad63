"""``preprocess --engine ray`` on a real local Ray runtime: the same shards (byte for byte) and
status records as the local engine, a worker killed with SIGKILL mid-run loses and
duplicates no clip, bad clips are recorded as locally, a killed run resumes from the cache."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli
from tests.test_bad_input import BAD_RUN_ARGS, make_bad_corpus

# One Ray cluster at a time: under pytest -n every test that starts one runs on the same worker.
pytestmark = pytest.mark.xdist_group("ray")

SLOW = pytest.mark.slow  # each run starts a Ray runtime (10-30 s on 2 shared cores)

ARGS = ("--split", "ogm", "--face-fps", "1", "--face-size", "224", "--allow-random-weights", "--workers", "2")


@pytest.fixture(scope="module", autouse=True)
def no_outside_cluster():
    """A RAY_ADDRESS in the environment must not send the tests to another cluster."""
    old = os.environ.pop("RAY_ADDRESS", None)
    yield
    if old is not None:
        os.environ["RAY_ADDRESS"] = old


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ray") / "corpus")
    run_cli("synth", "cremad", "--out", out, "--actors", "2", "--sentences", "1", "--seed", "3", check=True)
    return out


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ray") / "local")
    run_cli("preprocess", "cremad", "--root", corpus, "--out", out, *ARGS, check=True)
    return out


def outputs(out: str) -> dict[str, bytes]:
    """The shards, their index and status.jsonl, by relative path."""
    paths = sorted(glob.glob(os.path.join(out, "shards", "*", "*"))) + [os.path.join(out, "status.jsonl")]
    return {os.path.relpath(p, out): open(p, "rb").read() for p in paths}


def assert_same_outputs(out: str, reference: str) -> None:
    got, want = outputs(out), outputs(reference)
    assert got.keys() == want.keys() and any(k.endswith(".tar") for k in got)
    assert [k for k in got if got[k] != want[k]] == []  # byte-identical, status.jsonl included


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` and its command line (Ray workers show ``ray::<task>``)."""
    from avbalance.procs import children_by_parent

    children = children_by_parent()
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as fh:
                    found[child] = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cached(out: str, stage: str) -> list[str]:
    return glob.glob(os.path.join(out, "cache", stage, "*.npz"))


def start(corpus: str, out: str) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(REPO, "cli.py"), "preprocess", "cremad", "--root", corpus, "--out", out,
           *ARGS, "--engine", "ray"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


@SLOW
def test_ray_writes_the_shards_and_status_of_the_local_engine(corpus, local_run, tmp_path):
    out = str(tmp_path / "ray")  # through an fsspec URL: the storage every node would see
    proc = run_cli("preprocess", "cremad", "--root", corpus, "--out", "file://" + out, *ARGS, "--engine", "ray", check=True)
    assert "12 clips done, 0 failed (12 computed this run" in proc.stdout
    assert re.search(r"ray: running on a local Ray runtime: 1 node\(s\), \d+ CPUs", proc.stderr), proc.stderr
    assert_same_outputs(out, local_run)
    # The face actors ran the backend the driver resolved (auto: onnx when installed): a torch
    # run's shards differ from those bytes, so matching them means the actors used ONNX Runtime.
    backend = json.load(open(os.path.join(out, "preprocess.json")))["face_backend"]
    assert backend == json.load(open(os.path.join(local_run, "preprocess.json")))["face_backend"]
    if backend == "onnx":
        torch_run = str(tmp_path / "torch")
        run_cli("preprocess", "cremad", "--root", corpus, "--out", torch_run, *ARGS, "--backend", "torch", check=True)
        got, other = outputs(out), outputs(torch_run)
        assert [k for k in got if k.endswith(".tar") and got[k] != other[k]]


@SLOW
def test_a_worker_killed_mid_run_loses_and_duplicates_no_clip(corpus, local_run, tmp_path):
    out = str(tmp_path / "ray")
    proc = start(corpus, out)
    # A face actor in the middle of its chunk: some frames cached, its faces not yet.
    victim = wait_for(lambda: next((pid for pid, cmd in descendants(proc.pid).items() if cmd.startswith("ray::_FaceWorker.run")), None)
                      if cached(out, "frames") and not cached(out, "faces") else None, proc, "a busy face actor")
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert not alive(victim)
    assert "12 clips done, 0 failed (12 computed this run" in stdout
    assert_same_outputs(out, local_run)  # every clip once, as the local engine packs it


@SLOW
def test_bad_clips_are_recorded_as_by_the_local_engine(tmp_path):
    root = str(tmp_path / "corpus")
    make_bad_corpus(root)
    local = run_cli("preprocess", "cremad", "--root", root, "--out", str(tmp_path / "local"), *BAD_RUN_ARGS)
    remote = run_cli("preprocess", "cremad", "--root", root, "--out", str(tmp_path / "ray"), *BAD_RUN_ARGS, "--engine", "ray")
    assert local.returncode == remote.returncode == 1, remote.stderr  # finished, some clips failed
    assert "Traceback" not in remote.stderr
    assert local.stdout.split("preprocess:")[1].split("(")[0] == remote.stdout.split("preprocess:")[1].split("(")[0]
    assert_same_outputs(str(tmp_path / "ray"), str(tmp_path / "local"))


@SLOW
def test_a_killed_run_leaves_no_ray_process_and_the_rerun_resumes(corpus, local_run, tmp_path):
    out = str(tmp_path / "ray")
    before = set(glob.glob("/tmp/avb-ray-*"))
    proc = start(corpus, out)
    wait_for(lambda: len(cached(out, "frames")) >= 2, proc, "two cached clips")
    ray_procs = descendants(proc.pid)
    # The driver's process group, as Ctrl-C, a closed terminal or a batch scheduler signal it.
    # (SIGKILL to the driver pid alone left Ray's dashboard and runtime-env agents running.)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 60
    while time.time() < deadline and any(alive(p) for p in ray_procs):
        time.sleep(0.2)
    left = {p: c for p, c in ray_procs.items() if alive(p)}
    for pid in left:  # never leak processes from a test, even a failing one
        os.kill(pid, signal.SIGKILL)
    for leftover in set(glob.glob("/tmp/avb-ray-*")) - before:  # the killed run's session folder
        subprocess.run(["rm", "-rf", leftover], check=False)
    assert left == {}, f"Ray processes outlived their driver: {left}"
    assert not os.path.exists(os.path.join(out, "shards", "ogm", "shards.json"))

    kept = {p: os.stat(p).st_mtime_ns for stage in ("frames", "audio", "faces", "face_features") for p in cached(out, stage)}
    assert kept
    run_cli("preprocess", "cremad", "--root", corpus, "--out", out, *ARGS, "--engine", "ray", check=True)
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept  # cached outputs were reused, not redone
    assert_same_outputs(out, local_run)


def test_ray_address_needs_the_ray_engine(tmp_path):
    proc = run_cli("preprocess", "cremad", "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--ray-address", "auto")
    assert proc.returncode != 0 and "error:" in proc.stderr and "--engine ray" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_address_where_no_cluster_answers_is_refused_at_once(tmp_path):
    with socket.socket() as free:  # a port that was free a moment ago: nothing listens there
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.time()
    proc = run_cli("preprocess", "cremad", "--root", str(tmp_path), "--out", str(tmp_path / "out"),
                   "--engine", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "no Ray cluster answers" in proc.stderr
    assert time.time() - started < 60  # ray.init alone would retry for minutes


class FakeRay:
    """Stands in for the ``ray`` module: records how the engine starts its runtime."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, str | None]] = []

    def init(self, **kwargs) -> None:
        self.calls.append((kwargs, os.environ.get("PYTHONPATH")))

    def shutdown(self) -> None:
        pass


def ray_config(**options):
    from pipelines.config import PreprocessConfig

    return PreprocessConfig(root="corpus", out="out", stages=("frames", "audio", "pack"), workers=2,
                            engine="ray", **options)


def test_a_local_runtime_passes_its_environment_without_a_runtime_env(monkeypatch):
    """With a runtime_env, Ray cannot use the workers it prestarts and starts new ones after
    the first task; a local runtime's workers inherit the environment from its raylet instead."""
    from pipelines.engines.ray import RayEngine

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    engine = RayEngine(ray_config())
    engine._start()
    engine.close()
    (kwargs, pythonpath), = fake.calls
    assert "runtime_env" not in kwargs and kwargs["address"] == "local"
    assert pythonpath.split(os.pathsep) == [REPO, "/elsewhere"]  # this checkout first, at start
    assert os.environ["PYTHONPATH"] == "/elsewhere"  # the driver's own environment is left as it was

    cluster = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", cluster)
    RayEngine(ray_config(ray_address="10.0.0.1:6379"))._start()
    (kwargs, _), = cluster.calls  # a cluster's workers were not started here: they need the runtime_env
    assert kwargs["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] == REPO


def test_a_ray_worker_is_initialised_once_per_config(monkeypatch):
    import pipelines.engines.ray as ray_engine

    inits: list = []
    monkeypatch.setattr(ray_engine, "init_worker", lambda cfg, threads: inits.append((cfg.chunk, threads)))
    monkeypatch.setattr(ray_engine, "process_chunk", lambda jobs: [f"done {j}" for j in jobs])
    monkeypatch.setattr(ray_engine, "_READY", [], raising=False)
    first, other = ray_config(), ray_config(chunk=4)
    assert ray_engine._chunk_task(first, ["a"]) == ["done a"]
    for _ in range(3):
        ray_engine._chunk_task(ray_config(), ["b"])  # an equal config, as each task unpickles it
    ray_engine._chunk_task(other, ["c"])
    assert inits == [(8, 1), (4, 1)]


def test_a_cluster_that_wants_a_token_names_the_setting(monkeypatch):
    """Ray 2.60 clusters started with `ray start --head` use token authentication; a driver
    outside token mode is refused, and the message names the environment variable to set."""
    from avbalance.errors import UserError
    from pipelines.engines.ray import RayEngine

    class Refusing(FakeRay):
        def init(self, **kwargs) -> None:
            raise ConnectionError("Failed to connect to GCS: InvalidAuthToken: authentication failed")

    monkeypatch.setitem(sys.modules, "ray", Refusing())
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(UserError, match="RAY_AUTH_MODE=token"):
        RayEngine(ray_config(ray_address="10.0.0.1:6379"))._start()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # set, yet refused: the general message
    with pytest.raises(UserError, match="could not start or reach the Ray cluster") as refused:
        RayEngine(ray_config(ray_address="10.0.0.1:6379"))._start()
    assert "RAY_AUTH_MODE=token in the environment" not in str(refused.value)
