"""The tests' CLI runner (tests/cli_fork.py): a call forked from the server that has imported
the libraries gives what ``python cli.py`` started afresh gives, in a process of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from cli_fork import CLI, FORKER
from tests.conftest import REPO
from tests.test_run_folder import snapshot


@pytest.fixture
def forker():
    return FORKER  # the server run_cli uses


def fresh(args: list[str], env: dict[str, str], cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.mark.parametrize("args", [
    ["--help"],                                         # exit 0, stdout
    ["nonsense"],                                       # argparse's exit 2, stderr
    ["train", "--shards", "/nowhere/at/all"],           # a refusal: UserError's message and code
    ["train", "--set", "optim.lrr=1"],                  # a refused key
    ["manifest", "cremad", "--root", "/nowhere/at/all", "--out", "/nowhere/either"],
], ids=["help", "unknown-command", "missing-shards", "unknown-key", "missing-corpus"])
def test_a_forked_call_prints_and_exits_as_a_fresh_process(forker, args):
    env = dict(os.environ)
    forked = forker.run(args, env, REPO, 300)
    assert forked is not None, f"this call should have been forked: {forker.why_not(env)}"
    plain = fresh(args, env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert forked.stdout or forked.stderr  # each case says something


def test_another_script_of_the_repository_forks_as_it_runs_afresh(forker, tmp_path):
    """bench/gpu_check.py (its folder first on sys.path, as ``python bench/gpu_check.py`` has it)."""
    script = os.path.join(REPO, "bench", "gpu_check.py")
    args = ["--device", "cpu", "--only", "warp_drive", "--out", str(tmp_path / "gpu.json")]
    env = dict(os.environ)
    forked = forker.run(args, env, REPO, 300, script=script)
    plain = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO, env=env,
                           timeout=300)
    assert forked is not None and forked.args[1] == script
    assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert forked.returncode == 2 and "warp_drive" in forked.stderr


def test_a_forked_call_writes_what_a_fresh_process_writes(forker, tmp_path):
    """A synthetic corpus and its manifest, relative to the call's working folder: the same
    files, byte for byte (the manifest summary's timing aside)."""
    env = dict(os.environ)
    trees = {}
    for name, run in (("forked", lambda a: forker.run(a, env, str(tmp_path), 300)),
                      ("fresh", lambda a: fresh(a, env, str(tmp_path)))):
        for args in (["synth", "cremad", "--out", "corpus", "--actors", "2", "--sentences", "1", "--seed", "3"],
                     ["manifest", "cremad", "--root", "corpus", "--out", "manifest"]):
            proc = run(args)
            assert proc is not None and proc.returncode == 0, (name, proc)
        trees[name] = snapshot(str(tmp_path))
        with open(tmp_path / "manifest" / "summary.json", encoding="utf-8") as fh:
            summary = json.load(fh)
        assert summary.pop("seconds") >= 0
        trees[name]["manifest/summary.json"] = summary
        shutil.rmtree(tmp_path / "corpus")
        shutil.rmtree(tmp_path / "manifest")
    assert len(trees["forked"]) > 20 and trees["forked"] == trees["fresh"]


def test_the_call_gets_its_own_environment_and_the_test_keeps_its_own(forker):
    before = dict(os.environ)
    env = {**os.environ, "AVBALANCE_PROG": "avb-probe"}
    forked = forker.run(["--help"], env, REPO, 300)
    assert forked is not None and forked.stdout.startswith("usage: avb-probe ")
    without = {k: v for k, v in os.environ.items() if k != "AVBALANCE_PROG"}
    forked = forker.run(["--help"], without, REPO, 300)
    assert forked is not None and not forked.stdout.startswith("usage: avb-probe ")
    assert dict(os.environ) == before  # cli.main records AVBALANCE_PROG in its own process only


def test_a_variable_read_when_libraries_load_is_never_forked(forker):
    """Thread counts (and the like) are fixed when torch loads in the server: a call that sets
    them otherwise runs afresh."""
    forker.run(["--help"], dict(os.environ), REPO, 300)  # the server runs
    same = dict(os.environ)
    assert forker.can_fork(same), forker.why_not(same)
    threads = {**same, "OMP_NUM_THREADS": str(int(same.get("OMP_NUM_THREADS", "1")) + 1)}
    assert forker.why_not(threads) == "OMP_NUM_THREADS differs from the server's"
    assert forker.run(["--help"], threads, REPO, 300) is None
    assert forker.can_fork({**same, "AVBALANCE_QUIET": "0"})  # read when the command runs
    import torch  # noqa: F401  sets KMP_DUPLICATE_LIB_OK and the like here, as it did in the server
    assert forker.can_fork(dict(os.environ))


def test_a_test_that_changes_the_environment_for_a_while_does_not_change_the_server(forker, monkeypatch, tmp_path):
    """The server runs with the environment the suite had before any test ran, even when a test
    that changes it (here PYTHONPATH) is the one that starts it: that test's calls run afresh,
    the calls after it are forked."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert forker.run(["--help"], dict(os.environ), REPO, 300) is None  # the caller runs it afresh
    assert forker.why_not(dict(os.environ)) == "PYTHONPATH differs from the server's"
    monkeypatch.undo()
    forked = forker.run(["--help"], dict(os.environ), REPO, 300)
    assert forked is not None and forked.returncode == 0


def test_a_call_past_its_time_is_killed_with_what_it_started(forker, train_shards, tmp_path):
    env = dict(os.environ)
    args = ["train", "--config", "resnet_joint", "--shards", train_shards, "--out", str(tmp_path / "run"),
            "--set", "train.epochs=100000", "data.workers=1", "data.samples_per_epoch=16", "data.batch_size=8"]
    assert forker.can_fork(env), forker.why_not(env)  # else run() returns None and nothing times out
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        forker.run(args, env, REPO, 4)
    assert time.monotonic() - start < 60
    group = forker.last_pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the loader worker, orphaned, is reaped soon after
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"process group {group} outlived the timeout")
    # The server answers the next call: the killed child was reaped.
    after = forker.run(["--help"], env, REPO, 300)
    assert after is not None and after.returncode == 0
