"""The Ray engine against the local one (``bench/preprocess.py --engine ray``).

``preprocess --stages frames,audio,pack`` with ``--engine local`` and ``--engine ray`` on the
same clips and worker count, interleaved for ``--rounds`` rounds so that a busy machine
slows both alike; ratios are taken within a round, then their median. Each run records:

- whole run: the command's wall time, the Ray runtime's start and its workers' imports included;
- steady state: clips per second between the 10th and the 90th percentile of the clips'
  completion times (the mtimes of their cache files), so start-up and pack are left out;
- first clip: seconds from the command's start to the first cached clip (start-up);
- CPU seconds by process kind (sampled from ``/proc``): the driver, the workers, and the Ray
  runtime's own processes (GCS, raylet, agents, log monitor).

``--baseline REF`` (repeatable) adds the Ray engine of a git revision of this repository
(``git archive``), run in the same rounds: a change's before and after in one invocation.
``--cluster`` adds the Ray engine against a head node started once for all the rounds
(``ray start --head --block``; ``--ray-address``): what a run costs when the Ray runtime is
already up, as on a cluster, rather than started and stopped by each command.
``render`` gives the markdown table of docs/benchmarks.md from a stored result (``python
bench/tables.py docs/benchmarks.md`` rewrites it there).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from avbalance.procs import children_by_parent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
STAGES = "frames,audio,pack"
TARGET = 1.15  # issue 13: Ray over local, whole run, 576 clips


def _kind(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    if "default_worker.py" in cmd or cmd.startswith("ray::") or "cli.py preprocess" in cmd:
        return "workers"  # Ray workers, or the local engine's forked pool
    return "ray_runtime"


def _tree(roots: list[int]) -> list[int]:
    kids, todo, pids = children_by_parent(), list(roots), list(roots)
    while todo:
        for child in kids.get(todo.pop(), []):
            pids.append(child)
            todo.append(child)
    return pids


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_now(roots: list[int]) -> dict[int, float]:
    """CPU seconds used so far by every process below ``roots``."""
    out = {}
    for pid in _tree(roots):
        try:
            out[pid] = _cpu(pid)
        except (OSError, IndexError, ValueError):
            continue
    return out


class CpuSampler(threading.Thread):
    """Polls the CPU time of every process below the driver and ``others`` (a running
    cluster's head) until stopped; a process's last sample stands for its total (a poll every
    0.1 s misses little), less what it had used at ``before`` (a running cluster's processes)."""

    def __init__(self, driver: int, others: list[int], before: dict[int, float]) -> None:
        super().__init__(daemon=True)
        self.driver, self.roots, self.before = driver, [driver, *others], before
        self.seen: dict[int, tuple[str, float]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in _tree(self.roots):
                try:
                    kind = self.seen[pid][0] if pid in self.seen else _kind(pid, self.driver)
                    self.seen[pid] = (kind, _cpu(pid) - self.before.get(pid, 0.0))
                except (OSError, IndexError, ValueError):
                    continue
            time.sleep(0.1)

    def totals(self) -> dict[str, float]:
        self.done.set()
        self.join()
        out = {"driver": 0.0, "workers": 0.0, "ray_runtime": 0.0}
        for kind, cpu in self.seen.values():
            out[kind] += cpu
        return {k: round(v, 2) for k, v in out.items()}


def tree_of(ref: str, work: str) -> str:
    """A checkout of ``ref`` of this repository (its committed files) under ``work``."""
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", ref], check=True, capture_output=True, text=True).stdout.strip()
    path = os.path.join(work, f"tree-{rev}")
    if not os.path.exists(path):
        os.makedirs(path + ".part", exist_ok=True)
        archive = subprocess.run(["git", "-C", REPO, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", path + ".part"], input=archive, check=True)
        os.rename(path + ".part", path)
    return path


def run_once(tree: str, root: str, out: str, workers: int, engine: str, address: str | None,
             head: int | None = None) -> dict:
    """One ``preprocess`` run of the tree's CLI; its timings and CPU seconds by process kind
    (``head``: the pid of a running cluster's ``ray start``, whose processes count too)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(tree, "cli.py"), "preprocess", "cremad", "--split", "ogm", "--root", root,
           "--out", out, "--stages", STAGES, "--workers", str(workers), "--engine", engine]
    if engine == "ray" and address:
        cmd += ["--ray-address", address]
    env = {**os.environ, "PYTHONPATH": tree}
    others = [head] if head else []
    before = cpu_now(others)
    started, wall = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = CpuSampler(proc.pid, others, before)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - started
    cpu = sampler.totals()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err}")
    summary = json.load(open(os.path.join(out, "preprocess.json")))
    done = sorted(os.stat(p).st_mtime for p in glob.glob(os.path.join(out, "cache", "audio", "*.npz")))
    lo, hi = len(done) // 10, 9 * len(done) // 10
    return {"seconds": seconds, "clips_s": summary["clips"] / seconds, "phase_seconds": summary["phase_seconds"],
            "first_clip_s": done[0] - wall, "steady_clips_s": (hi - lo) / (done[hi] - done[lo]), "cpu_s": cpu}


@contextmanager
def running_cluster(workers: int) -> Iterator[tuple[str, int]]:
    """A Ray head node of ``workers`` CPUs on this machine for the block; its address and the
    pid of its ``ray start`` process.

    ``--block`` keeps Ray's processes in the group of the ``ray start`` process that this
    starts, so they are stopped by that group alone (``ray stop`` would stop every Ray
    runtime on the machine, other users' too)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="avb-bench-ray-")
    # Ray 2.60 starts clusters with token authentication (~/.ray/auth_token), but a driver
    # that connects sends the token only in token mode: set it for the head and the drivers.
    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             f"--num-cpus={workers}", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start --head on port {port} did not come up") from None
                time.sleep(0.5)
        time.sleep(5)  # the raylet registers after the GCS answers
        yield f"127.0.0.1:{port}", head.pid
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)
        if auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth


def shard_bytes(out: str) -> dict[str, bytes]:
    return {os.path.relpath(p, out): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "shards", "*", "*")))}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def compare(root: str, n: int, workers: int, work: str, address: str | None, rounds: int,
            baselines: list[str], cluster: bool = False, on_round: Callable[[dict], None] | None = None) -> dict:
    """Interleaved rounds of local, ray, ray on a running head node and each baseline's ray;
    medians and paired ratios. ``on_round`` gets the result so far after every round (a long
    run on a busy machine keeps what it measured)."""
    variants = [("local", REPO, "local", None, None), ("ray", REPO, "ray", address, None)]
    for ref in baselines:  # named by commit: a branch name moves
        tree = tree_of(ref, work)
        variants.append((f"ray@{os.path.basename(tree).removeprefix('tree-')}", tree, "ray", address, None))
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    res: dict = {}
    # SIGTERM unwinds (a head node started here is stopped), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with running_cluster(workers) if cluster else _nothing() as head:
        if head:
            variants.append(("ray, running cluster", REPO, "ray", *head))
            runs["ray, running cluster"] = []
        for done in range(1, rounds + 1):
            for name, tree, engine, at, pid in variants:
                runs[name].append(run_once(tree, root, _out(work, name), workers, engine, at, pid))
            res = summarise(runs, n, workers, done, address, work)
            if on_round:
                on_round(res)
    return res


def summarise(runs: dict[str, list[dict]], n: int, workers: int, rounds: int, address: str | None, work: str) -> dict:
    """Medians over the rounds, ratios paired within a round, shard identity."""
    res: dict = {"stages": STAGES, "clips": n, "workers": workers, "cpu": os.cpu_count(), "rounds": rounds,
                 "ray_address": address, "runs": runs, "engines": {}}
    for name, rs in runs.items():
        entry = {k: _median(rs, k) for k in ("seconds", "clips_s", "first_clip_s", "steady_clips_s")}
        entry["pack_s"] = statistics.median(r["phase_seconds"]["pack"] for r in rs)
        entry["cpu_s"] = {k: statistics.median(r["cpu_s"][k] for r in rs) for k in rs[0]["cpu_s"]}
        if name != "local":
            pairs = list(zip(runs["local"], rs))
            entry["whole_run_ratio"] = statistics.median(b["seconds"] / a["seconds"] for a, b in pairs)
            entry["steady_state_ratio"] = statistics.median(a["steady_clips_s"] / b["steady_clips_s"] for a, b in pairs)
            entry["cpu_ratio"] = statistics.median(sum(b["cpu_s"].values()) / sum(a["cpu_s"].values()) for a, b in pairs)
            entry["identical_shards"] = shard_bytes(_out(work, name)) == shard_bytes(_out(work, "local"))
        res["engines"][name] = entry
    return res


def _out(work: str, name: str) -> str:
    return os.path.join(work, "engine-" + name.replace(", ", "-").replace(" ", "-"))


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def fixed_seconds(res: dict, name: str) -> float:
    """Median over the runs of the whole run less its clips at the run's steady rate: start-up,
    the tail, pack and shut-down."""
    return statistics.median(r["seconds"] - res["clips"] / r["steady_clips_s"] for r in res["runs"][name])


def render(res: dict) -> str:
    """The docs/benchmarks.md table of a ``compare`` result."""
    lines = ["| engine | whole run (s) | first clip (s) | steady state clips/s | pack and shut-down (s) | fixed (s) | CPU s: driver / workers / Ray runtime | whole-run ratio | steady-state ratio | CPU ratio | shards identical |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for name, e in res["engines"].items():
        cpu = " / ".join(f"{e['cpu_s'][k]:.1f}" for k in ("driver", "workers", "ray_runtime"))
        ratios = ("—",) * 4 if name == "local" else (f"{e['whole_run_ratio']:.2f}x", f"{e['steady_state_ratio']:.2f}x",
                                                     f"{e['cpu_ratio']:.2f}x", str(e["identical_shards"]).lower())
        lines.append(f"| {name} | {e['seconds']:.1f} | {e['first_clip_s']:.1f} | {e['steady_clips_s']:.1f} | {e['pack_s']:.2f} | {fixed_seconds(res, name):.1f} | {cpu} | "
                     + " | ".join(ratios) + " |")
    ray = res["engines"]["ray"]
    met = "met" if ray["whole_run_ratio"] <= TARGET else "not met"
    lines += ["", f"{res['clips']} clips, {res['workers']} worker CPUs, {res['rounds']} interleaved rounds (medians; ratios "
              f"paired within a round). Ray over local: **{ray['whole_run_ratio']:.2f}x** for the whole run, "
              f"**{ray['steady_state_ratio']:.2f}x** at steady state; the target of ≤ {TARGET}x for the whole run is **{met}**."]
    return "\n".join(lines)
