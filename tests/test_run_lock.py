"""One writer per run folder (trainer/run_lock.py): a second process is refused with the holder
named, a killed holder leaves no stuck lock, and a sweep does not start a run that another live
process is training; the sweep's progress counts and the whole error of a failed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import yaml

from avbalance.errors import UserError
from tests.conftest import REPO, run_cli
from trainer.run_lock import hold_run_folder, holder

# A child that takes the lock, says so, and holds it until its stdin gets a line (or it is killed).
HOLD = ("import sys\nfrom trainer.run_lock import hold_run_folder\n"
        "with hold_run_folder(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.readline()\n")


@contextmanager
def held_by_child(folder: str, code: str = HOLD):
    """A child process holding ``folder``'s lock for the ``with`` block (killed at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", code, folder], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "held", "the child did not take the lock"
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it forked
        except ProcessLookupError:
            pass
        proc.wait()


def squash(text: str) -> str:
    return " ".join(text.split())


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    folder = str(tmp_path / "run")
    with held_by_child(folder) as child:
        with pytest.raises(UserError) as refused:
            with hold_run_folder(folder):
                pytest.fail("took a lock that a live process holds")
        message = squash(str(refused.value))
        assert f"{folder} is being trained by another process (pid {child.pid} on host " in message, message
        assert "wait for it to finish, or stop it" in message and "hold_run_folder" in message  # its command line
        found = holder(folder)
        assert found is not None and found["pid"] == child.pid and found["since"].endswith("Z"), found
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    assert holder(folder) is None
    with hold_run_folder(folder) as mine:
        assert mine["pid"] == os.getpid() and holder(folder)["pid"] == os.getpid()
    assert holder(folder) is None and os.path.exists(os.path.join(folder, ".lock"))  # released, file kept


def test_a_sigkilled_holder_leaves_no_lock(tmp_path):
    folder = str(tmp_path / "run")
    with held_by_child(folder) as child:
        assert holder(folder)["pid"] == child.pid
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert holder(folder) is None
        with hold_run_folder(folder) as mine:   # at once: no waiting, no stale lock to remove
            assert mine["pid"] == os.getpid()


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_holder(tmp_path):
    """A data-loader worker forked by the holder: the lock dies with the holder, not with it."""
    folder = str(tmp_path / "run")
    code = ("import os, sys, time\nfrom trainer.run_lock import hold_run_folder\n"
            "with hold_run_folder(sys.argv[1]):\n    print('held', flush=True)\n    pid = os.fork()\n"
            "    if pid == 0:\n        os.write(1, b'worker\\n')\n        time.sleep(60)\n        os._exit(0)\n"
            "    os.write(1, b'%d\\n' % pid)\n    sys.stdin.readline()\n")  # one write each: lines whole
    with held_by_child(folder, code) as child:
        # The worker's line says it runs Python code: past the fork handlers that drop the lock.
        lines = {child.stdout.readline().strip() for _ in range(2)}
        assert "worker" in lines, lines
        worker = int(next(ln for ln in lines if ln != "worker"))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        os.kill(worker, 0)                      # the forked worker still lives...
        assert holder(folder) is None           # ...and holds nothing


def test_a_look_by_holder_is_not_a_holder(tmp_path):
    """``holder()`` takes a shared lock for a moment to look: a process starting right then is
    not refused for it (it tries again for a moment)."""
    import fcntl
    import threading

    folder = str(tmp_path / "run")
    with hold_run_folder(folder):
        pass
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)     # a look in progress
    threading.Timer(0.05, os.close, (fd,)).start()
    with hold_run_folder(folder) as mine:
        assert mine["pid"] == os.getpid()


def test_holder_creates_no_file(tmp_path):
    assert holder(str(tmp_path / "absent")) is None
    assert not (tmp_path / "absent").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x: 1\n")
    assert holder(str(tmp_path / "run")) is None
    assert os.listdir(tmp_path / "run") == ["config.yaml"]


def test_error_block_keeps_the_whole_error(tmp_path):
    from experiments.sweep import error_block

    log = tmp_path / "train.log"
    log.write_text("# python cli.py train ...\nepoch 1/3: val accuracy 0.5\n\n"
                   "error: the first line of a message that the CLI\n  wrapped over\n  three lines\n")
    assert error_block(str(log)) == ["error: the first line of a message that the CLI", "  wrapped over", "  three lines"]
    frames = [f'  File "x.py", line {i}, in f\n    g()' for i in range(20)]
    log.write_text("error: an earlier refusal\nTraceback (most recent call last):\n" + "\n".join(frames) +
                   "\nRuntimeError: the end\n")
    block = error_block(str(log))
    assert len(block) == 15 and block[0].startswith("Traceback") and block[-1] == "RuntimeError: the end"
    assert "lines left out" in block[1]
    log.write_text("one\ntwo\nthree\nfour\nfive\nsix\n")    # killed from outside: no error printed
    assert error_block(str(log)) == ["two", "three", "four", "five", "six"]


def test_progress_goes_to_stderr_unless_quiet(monkeypatch, capsys):
    from experiments.sweep import _to_stderr, progress_line

    line = progress_line({"finished": 3, "running": 2, "elsewhere": 0, "failed": 1, "waiting": 10})
    assert line == "sweep: 3 finished, 2 running, 1 failed, 10 waiting"
    monkeypatch.delenv("AVBALANCE_QUIET", raising=False)
    _to_stderr(line)
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.setenv("AVBALANCE_QUIET", "1")
    _to_stderr(line)
    assert capsys.readouterr().err == ""


def test_a_sweep_skips_a_run_held_elsewhere_and_prints_failed_runs_whole_error(tmp_path):
    """Two runs: one whose folder a live process holds (not started, recorded as running
    elsewhere), one that fails (no shard set: a refusal wrapped over several lines) from a
    folder left by a run killed before its first checkpoint. Through ``cli.py sweep``."""
    from experiments.sweep import load_sweep, plan_lines

    doc = {"out": str(tmp_path / "runs"), "shards": str(tmp_path / "shard-sets-that-were-never-made" / "{split}"),
           "blocks": [{"name": "t", "preset": "resnet", "splits": ["kfold1"], "seeds": [0],
                       "methods": ["joint", "mlb"], "fusions": ["late_linear"]}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    sweep = load_sweep(str(path))
    held_run, failing_run = sweep.runs
    held, failing = held_run.folder(sweep.out), failing_run.folder(sweep.out)
    os.makedirs(failing)
    with open(os.path.join(failing, "metrics.jsonl"), "w") as fh:  # left by a run killed early
        fh.write("{}\n")
    with held_by_child(held) as child:
        lines, _ = plan_lines(sweep)
        assert lines[0].startswith(f"running {held_run.id}") and f"pid {child.pid}" in lines[0], lines
        before = {n: open(os.path.join(held, n), "rb").read() for n in os.listdir(held)}
        env = {**os.environ}
        env.pop("AVBALANCE_QUIET", None)
        proc = run_cli("sweep", "--config", str(path), env=env)
        assert child.poll() is None
        # The held folder: not touched (no train.log, no sweep_run.json, its lock record as it was).
        assert {n: open(os.path.join(held, n), "rb").read() for n in os.listdir(held)} == before
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out, err = proc.stdout, proc.stderr

    status = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    by_id = {r["id"]: r for r in status["runs"]}
    assert by_id[held_run.id]["status"] == "running" and by_id[held_run.id]["elsewhere"]["pid"] == child.pid
    failed = by_id[failing_run.id]
    assert failed["status"] == "failed"
    block = failed["error"]
    assert len(block) >= 2 and block[0].startswith("error: no shards.json"), block   # wrapped: several lines
    assert block[-1].rstrip().endswith("preprocess` first"), block
    assert " ".join(ln.strip() for ln in block) == failed["reason"]
    # The killed run's leftovers were cleared, the lock file kept.
    assert "metrics.jsonl" not in os.listdir(failing) and ".lock" in os.listdir(failing)

    # Progress on stderr at each start and end; the summary and the whole error on stdout.
    progress = [ln for ln in err.splitlines() if ln.startswith("sweep: ") and " waiting" in ln]
    assert progress == [
        "sweep: 0 finished, 0 running, 1 running elsewhere, 0 failed, 1 waiting (t/joint-late_linear/kfold1-s0 running elsewhere)",
        "sweep: 0 finished, 1 running, 1 running elsewhere, 0 failed, 0 waiting (started t/mlb-late_linear/kfold1-s0)",
        "sweep: 0 finished, 0 running, 1 running elsewhere, 1 failed, 0 waiting (t/mlb-late_linear/kfold1-s0 failed)",
    ], err
    assert "1 running elsewhere (not started here)" in out, out
    shown = out.splitlines()
    assert any(ln.startswith(f"  {held_run.id}: pid {child.pid} on host ") for ln in shown), out
    name = shown.index(f"  {failing_run.id} (log: {os.path.join(failing, 'train.log')})")
    assert shown[name + 1:name + 1 + len(block)] == [f"      {ln}" for ln in block], out


TRAIN_SET = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
             "data.batch_size=8", "data.workers=0", "data.samples_per_epoch=16", "train.patience=0"]


@pytest.mark.slow
def test_two_concurrent_trains_on_one_run_folder(train_shards, tmp_path):
    """Two real ``cli.py train`` processes on one folder (loop.train locks it on the main rank
    where the run folder starts to change): the second is refused
    with the first one named and the first trains on; once the first is SIGKILLed, a resume
    takes the folder at once and finishes."""
    import torch

    run = str(tmp_path / "run")
    cli = os.path.join(REPO, "cli.py")
    first = subprocess.Popen([sys.executable, cli, "train", "--config", "resnet_joint", "--shards", train_shards,
                              "--out", run, "--set", *TRAIN_SET, "train.epochs=100000"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(run, "last.pt")):
            assert first.poll() is None, f"the first train ended: {first.stderr.read()}"
            assert time.time() < deadline, "the first train wrote no checkpoint in time"
            time.sleep(0.2)
        found = holder(run)   # taken before the folder changed, so before its first checkpoint
        assert found is not None and found["pid"] == first.pid, f"the first train holds no lock on {run}: {found}"
        second = run_cli("train", "--shards", train_shards, "--out", run, "--resume")
        text = squash(second.stderr)
        assert second.returncode != 0 and second.stderr.startswith("error: ") and "Traceback" not in text, second.stderr
        assert f"{run} is being trained by another process (pid {first.pid} on host " in text, text
        assert first.poll() is None, "the first train stopped"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert holder(run) is None
    done = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=True)["state"]["epoch"]
    third = run_cli("train", "--shards", train_shards, "--out", run, "--resume", "--set", f"train.epochs={done + 1}")
    assert third.returncode == 0, third.stderr
    assert os.path.exists(os.path.join(run, "eval_test.json"))
