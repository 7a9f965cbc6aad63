"""``cli.py sweep --engine local|ray|slurm``: the same 4 tiny runs (two methods x two seeds) give
the same numbers and sweep.json states on every engine (CPU runs are deterministic for a seed
and a thread count); a Ray worker SIGKILLed mid-run is retried and its run resumes from last.pt
to the undisturbed result; Slurm through submitit's local executor; and the refusals, each one
``error:`` line that writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from avbalance.procs import children_by_parent
from tests.conftest import REPO, run_cli

# One Ray cluster at a time: under pytest -n every test that starts one runs on the same worker.
pytestmark = pytest.mark.xdist_group("ray")

SLOW = pytest.mark.slow  # real train processes (and a Ray runtime): a minute or two each on 2 shared cores
# The tiny runs of tests/test_sweep.py, with 2 epochs: a run killed after its first checkpoint resumes.
TINY = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
        "data.batch_size=8", "data.workers=0", "data.samples_per_epoch=16", "train.epochs=2", "train.patience=0"]
RUN_IDS = [f"t/{m}-late_linear/kfold1-s{s}" for m in ("joint", "mlb") for s in (0, 1)]


@pytest.fixture(scope="module", autouse=True)
def no_outside_cluster():
    """A RAY_ADDRESS in the environment must not send the tests to another cluster."""
    old = os.environ.pop("RAY_ADDRESS", None)
    yield
    if old is not None:
        os.environ["RAY_ADDRESS"] = old


def sweep_file(folder, shards: str | None = None) -> str:
    """Two methods x two seeds on one shard set (made by the ``train_shards`` fixture)."""
    shards = shards or os.path.join(str(folder), "no-shards", "kfold1")
    doc = {"out": os.path.join(str(folder), "runs"), "shards": os.path.join(os.path.dirname(shards), "{split}"), "set": TINY,
           "blocks": [{"name": "t", "preset": "resnet", "splits": [os.path.basename(shards)], "seeds": [0, 1],
                       "methods": ["joint", "mlb"], "fusions": ["late_linear"]}]}
    path = os.path.join(str(folder), "sweep.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh)
    return path


def sweep_command(path: str, out: str, *options: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "cli.py"), "sweep", "--config", path, "--out", out, *options]


def run_env(**extra: str) -> dict[str, str]:
    """One thread per run (deterministic numbers), progress lines on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("AVBALANCE_QUIET", None)
    env.pop("RAY_ADDRESS", None)
    return env


def sweep(path: str, out: str, *options: str, **env: str) -> subprocess.CompletedProcess:
    proc = run_cli(*sweep_command(path, out, *options)[2:], env=run_env(**env), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def results(out: str) -> dict[str, dict]:
    """Each run's test accuracy and confusion matrix, by run id."""
    found = {}
    for run_id in RUN_IDS:
        path = os.path.join(out, *run_id.split("/"), "eval_test.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                m = json.load(fh)
            found[run_id] = {"accuracy": m["accuracy"], "confusion": m["confusion"]}
    return found


def states(out: str) -> dict[str, str]:
    with open(os.path.join(out, "sweep.json"), encoding="utf-8") as fh:
        return {r["id"]: r["status"] for r in json.load(fh)["runs"]}


def progress(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("sweep: ") and ln.split(" (")[0].endswith(" waiting")]


@pytest.fixture(scope="module")
def grid(train_shards, tmp_path_factory) -> str:
    return sweep_file(tmp_path_factory.mktemp("engines"), train_shards)


@pytest.fixture(scope="module")
def local_runs(grid) -> str:
    """The reference: the 4 runs with ``--engine local``."""
    out = os.path.join(os.path.dirname(grid), "local")
    sweep(grid, out)
    assert len(results(out)) == 4 and set(states(out).values()) == {"done"}
    return out


@SLOW
def test_ray_gives_the_numbers_and_states_of_the_local_engine(grid, local_runs):
    out = os.path.join(os.path.dirname(grid), "ray")
    proc = sweep(grid, out, "--engine", "ray")
    assert "Ray tasks (1 CPU and 0 GPUs per run, retried 3 times) on a local Ray runtime: 1 node(s)" in proc.stdout, proc.stdout
    assert results(out) == results(local_runs)
    assert states(out) == states(local_runs)
    lines = progress(proc.stderr)  # a line as each run is seen starting and as it ends
    assert all(any(ln.endswith(f"(started {r})") for ln in lines) and any(ln.endswith(f"({r} finished)") for ln in lines)
               for r in RUN_IDS), proc.stderr
    assert lines[-1].startswith("sweep: 4 finished, 0 running, 0 failed, 0 waiting"), lines
    for run_id in RUN_IDS:  # the same train command but where the device follows --gpus-per-run
        with open(os.path.join(out, *run_id.split("/"), "train.log"), encoding="utf-8") as fh:
            (command,) = [ln for ln in fh if ln.startswith("# ")]
        assert command.rstrip().endswith("--set train.device=cpu") and "--resume" not in command
    again = sweep(grid, out, "--engine", "ray")  # nothing to do: no runtime started
    assert "(4 finished, 0 to run)" in again.stdout and "Ray runtime: 1 node" not in again.stdout, again.stdout


@SLOW
def test_slurm_through_submitits_local_executor_gives_the_local_numbers(grid, local_runs):
    out = os.path.join(os.path.dirname(grid), "slurm")
    proc = sweep(grid, out, "--engine", "slurm", "--slurm-time", "20", AVBALANCE_SLURM_CLUSTER="local")
    assert "one Slurm job per run (submitit's local executor)" in proc.stdout, proc.stdout
    assert results(out) == results(local_runs)
    assert states(out) == states(local_runs)
    lines = progress(proc.stderr)
    assert all(any(ln.endswith(f"({r} finished)") for ln in lines) for r in RUN_IDS), proc.stderr
    assert lines[-1].startswith("sweep: 4 finished, 0 running, 0 failed, 0 waiting"), lines
    for run_id in RUN_IDS:  # submitit's files next to the run: the job's logs and its result
        names = os.listdir(os.path.join(out, *run_id.split("/"), "slurm"))
        assert any(n.endswith("_log.out") for n in names) and any(n.endswith("_result.pkl") for n in names), names


def train_process(root: int, folder: str) -> tuple[int, int] | None:
    """(pid, parent pid) of the ``cli.py train`` of ``folder`` below ``root``, once there is one."""
    kids = children_by_parent()
    todo = [root]
    while todo:
        for pid in kids.get(todo.pop(), []):
            todo.append(pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "train" in argv and folder in argv:
                parent = next((p for p, children in kids.items() if pid in children), -1)
                return pid, parent
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@SLOW
def test_a_ray_worker_killed_mid_run_is_retried_and_the_run_resumes_to_the_same_result(grid, local_runs):
    """SIGKILL to the Ray worker running a task, after the run's first checkpoint: its train
    process dies with it, Ray retries the task, the retry resumes from last.pt, and the run
    ends where the undisturbed run ended."""
    victim = RUN_IDS[0]
    out = os.path.join(os.path.dirname(grid), "ray-killed")
    folder = os.path.join(out, *victim.split("/"))
    proc = subprocess.Popen(sweep_command(grid, out, "--engine", "ray", "--only", victim), cwd=REPO, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        found = None
        while found is None:
            assert proc.poll() is None, f"the sweep ended before the kill: {proc.communicate()}"
            assert time.time() < deadline, "no checkpoint in time"
            if os.path.exists(os.path.join(folder, "last.pt")):  # its first epoch is saved
                found = train_process(proc.pid, folder)
            time.sleep(0.05)
        train, worker = found
        assert command_of(worker).startswith("ray::"), command_of(worker)  # the Ray worker running the task
        os.kill(worker, signal.SIGKILL)
        assert not os.path.exists(os.path.join(folder, "eval_test.json")), "the run had finished: nothing was interrupted"
        for _ in range(100):  # the train process dies with its worker (PR_SET_PDEATHSIG) ...
            if not alive(train):
                break
            time.sleep(0.05)
        died_with_worker = not alive(train)
        if not died_with_worker:  # ... as it would with its node; never leave it running
            os.kill(train, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout + stderr
    assert died_with_worker, "the train process outlived its Ray worker"
    assert results(out) == {victim: results(local_runs)[victim]}
    assert states(out)[victim] == "done"
    with open(os.path.join(folder, "train.log"), encoding="utf-8") as fh:
        commands = [ln.rstrip() for ln in fh if ln.startswith("# ")]
    assert len(commands) == 2 and not commands[0].endswith("--resume") and commands[1].endswith("--resume"), commands
    with open(os.path.join(out, "sweep.json"), encoding="utf-8") as fh:
        record = next(r for r in json.load(fh)["runs"] if r["id"] == victim)
    assert record["resumed"] is True and record["returncode"] == 0


# Refusals: fast, no run and no Ray runtime.

def refused(args: list[str], *words: str, env: dict[str, str] | None = None) -> str:
    proc = run_cli("sweep", *args, env=env or run_env(), timeout=300)
    text = " ".join(proc.stderr.split())
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    assert all(w in text for w in words), text
    return text


@pytest.mark.parametrize("options, words", [
    (["--engine", "spark"], ["--engine", "invalid choice: 'spark'"]),
    (["--slurm-partition", "gpu"], ["--slurm-partition is for --engine slurm, not local"]),
    (["--engine", "ray", "--slurm-time", "60"], ["--slurm-time is for --engine slurm, not ray"]),
    (["--gpus-per-run", "1"], ["--gpus-per-run is for --engine ray or slurm, not local"]),
    (["--engine", "slurm", "--devices", "0,1"], ["--devices is for --engine local, not slurm"]),
    (["--engine", "slurm", "--ray-address", "auto"], ["--ray-address is for --engine ray, not slurm"]),
    (["--engine", "ray", "--ray-address", "127.0.0.1:1", "--jobs", "2"], ["drop --jobs"]),
])
def test_options_of_another_engine_are_refused(tmp_path, options, words):
    path = sweep_file(tmp_path)
    refused(["--config", path, "--out", str(tmp_path / "out"), *options], *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", ["--out", "file"])
def test_a_relative_out_with_a_cluster_address_is_refused(tmp_path, given):
    name = f"relative-runs-{os.getpid()}-{given}"  # relative to the repository, where the command runs
    path = sweep_file(tmp_path)
    if given == "file":
        doc = yaml.safe_load(open(path))
        doc["out"] = name
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh)
    text = refused(["--config", path, *(["--out", name] if given == "--out" else []), "--engine", "ray",
                    "--ray-address", "127.0.0.1:1"], name, "relative path", "every node", "absolute --out")
    assert "no Ray cluster answers" not in text  # refused first, without looking for the cluster
    assert not os.path.exists(os.path.join(REPO, name))


def test_slurm_without_slurm_here_says_where_to_run(tmp_path):
    path = sweep_file(tmp_path)
    env = run_env(PATH=os.path.dirname(sys.executable))  # no sbatch on it
    env.pop("AVBALANCE_SLURM_CLUSTER", None)
    refused(["--config", path, "--out", str(tmp_path / "out"), "--engine", "slurm"], "no Slurm here", "login node",
            "--dry-run", env=env)
    assert not (tmp_path / "out").exists()


def test_slurm_dry_run_shows_the_submission_and_submits_nothing(tmp_path):
    path = sweep_file(tmp_path)
    out = tmp_path / "out"
    env = run_env()
    env.pop("AVBALANCE_SLURM_CLUSTER", None)
    proc = run_cli(*sweep_command(path, str(out), "--engine", "slurm", "--dry-run", "--gpus-per-run", "1",
                                  "--cpus-per-run", "4", "--slurm-partition", "gpu", "--slurm-time", "90")[2:],
                   env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = next(ln for ln in lines if ln.startswith("slurm: would submit 4 job(s)"))
    params = json.loads(head.split("parameters ", 1)[1].rstrip(":"))
    assert {k: params[k] for k in ("cpus_per_task", "gpus_per_node", "slurm_partition", "timeout_min", "nodes")} == \
        {"cpus_per_task": 4, "gpus_per_node": 1, "slurm_partition": "gpu", "timeout_min": 90, "nodes": 1}
    for run_id in RUN_IDS:
        (command,) = [ln for ln in lines if ln.startswith(f"  {run_id}: ")]
        assert " train --config " in command and f"--out {out}/{run_id}" in command
        assert command.endswith("--set train.device=cuda"), command  # the device follows --gpus-per-run
    assert not out.exists()


class FakeRay:
    """Stands in for ``ray``: a runtime that starts, with the nodes and resources given."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources
        self.inits: list[dict] = []
        self.shutdowns = 0

    def init(self, **kwargs) -> None:
        self.inits.append(kwargs)

    def shutdown(self) -> None:
        self.shutdowns += 1

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": dict(self.resources)}]

    def cluster_resources(self) -> dict[str, float]:
        return dict(self.resources)


@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_gpus_per_run_on_a_ray_cluster_without_gpus_is_refused(tmp_path, monkeypatch, capsys, address):
    import cli
    import experiments.engines.ray as ray_engine

    fake = FakeRay({"CPU": 8.0, "memory": 1e9})
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(ray_engine, "_check_reachable", lambda address: None)
    out = tmp_path / "out"
    code = cli.main(["sweep", "--config", sweep_file(tmp_path), "--out", str(out), "--engine", "ray", "--gpus-per-run", "1",
                     *(["--ray-address", address] if address else [])])
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0 and err.startswith("error: --gpus-per-run 1: ") and "has no GPU" in err, err
    assert ("the Ray cluster at 10.0.0.1:6379" if address else "the local Ray runtime (this machine)") in err
    assert "ray start --num-gpus N" in err and "--gpus-per-run 0" in err
    assert len(fake.inits) == 1 and fake.shutdowns == 1  # connected to look, then let go
    assert not out.exists()  # nothing written


def test_the_engine_choices_are_the_registered_engines():
    import argparse

    import cli
    from experiments.engines import SWEEP_ENGINES

    sweep_parser = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sweep"]
    (engine,) = [a for a in sweep_parser._actions if "--engine" in a.option_strings]
    assert sorted(engine.choices) == SWEEP_ENGINES.names() == ["local", "ray", "slurm"]


def test_a_task_decides_new_or_resume_when_it_starts(tmp_path):
    """``start_run``, the body of every engine's task: the same task resumes once the run has
    a last.pt (a retried Ray task, a requeued Slurm job), and clears what a run killed before
    its first checkpoint left."""
    from experiments.sweep import RunTask, start_run

    folder = tmp_path / "run"
    echo = [sys.executable, "-c", "import os, sys; print(sys.argv[1:], os.environ['MARK'])"]
    task = RunTask("b/r", str(folder), echo, {"MARK": "set by the engine"}, {"id": "b/r"})
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")  # left by a run killed before its first checkpoint
    first = start_run(task)
    assert (first.status, first.returncode, first.resumed) == ("ran", 0, False)
    assert not (folder / "metrics.jsonl").exists() and json.loads((folder / "sweep_run.json").read_text()) == {"id": "b/r"}
    (folder / "last.pt").write_bytes(b"")  # a checkpoint, as a killed attempt leaves it
    second = start_run(task)
    assert (second.status, second.resumed) == ("ran", True)
    log = (folder / "train.log").read_text().splitlines()
    assert log == [f"# {' '.join(echo)}", "[] set by the engine", f"# {' '.join(echo)} --resume", "['--resume'] set by the engine"]
    (folder / "eval_test.json").write_text("{}")
    assert start_run(task).status == "done"


def test_only_the_runs_train_process_counts_as_started(tmp_path):
    """Ray and Slurm see a run start when its train holds the folder's lock; the worker that
    readies the folder holds it a moment first, and is not taken for the train."""
    from experiments.engines.base import notice_started
    from experiments.sweep import RunTask
    from trainer.run_lock import hold_run_folder

    folder = str(tmp_path / "run")
    task = RunTask("b/r", folder, [], {}, {})
    seen: dict[str, int] = {}
    calls: list[dict] = []
    with hold_run_folder(folder):  # this process: not a train of the run
        notice_started([task], seen, lambda t, info: calls.append(info))
    assert calls == []
    code = ("import sys\nfrom trainer.run_lock import hold_run_folder\nwith hold_run_folder(sys.argv[-2]):\n"
            "    print('held', flush=True)\n    sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code, "train", "--out", folder, "--resume"], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        for _ in range(2):  # reported once
            notice_started([task], seen, lambda t, info: calls.append(info))
    finally:
        child.communicate("done\n", timeout=30)
    assert len(calls) == 1 and calls[0]["pid"] == child.pid and calls[0]["resumed"] is True
