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
``--render FILE`` prints the markdown table of docs/benchmarks.md from a stored result.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
STAGES = "frames,audio,pack"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _kind(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    if "default_worker.py" in cmd or cmd.startswith("ray::") or "cli.py preprocess" in cmd:
        return "workers"  # Ray workers, or the local engine's forked pool
    return "ray_runtime"


class CpuSampler(threading.Thread):
    """Polls the CPU time of every process below ``driver`` until stopped (a process's last
    sample stands for its total: a poll every 0.1 s misses little)."""

    def __init__(self, driver: int) -> None:
        super().__init__(daemon=True)
        self.driver, self.seen, self.done = driver, {}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            kids, todo, pids = _children(), [self.driver], [self.driver]
            while todo:
                for child in kids.get(todo.pop(), []):
                    pids.append(child)
                    todo.append(child)
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        fields = fh.read().rsplit(")", 1)[1].split()
                    kind = self.seen[pid][0] if pid in self.seen else _kind(pid, self.driver)
                    self.seen[pid] = (kind, (int(fields[11]) + int(fields[12])) / TICK)
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


def run_once(tree: str, root: str, out: str, workers: int, engine: str, address: str | None) -> dict:
    """One ``preprocess`` run of the tree's CLI; its timings and CPU seconds by process kind."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(tree, "cli.py"), "preprocess", "cremad", "--split", "ogm", "--root", root,
           "--out", out, "--stages", STAGES, "--workers", str(workers), "--engine", engine]
    if engine == "ray" and address:
        cmd += ["--ray-address", address]
    env = {**os.environ, "PYTHONPATH": tree}
    started, wall = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = CpuSampler(proc.pid)
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


def shard_bytes(out: str) -> dict[str, bytes]:
    return {os.path.relpath(p, out): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "shards", "*", "*")))}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def compare(root: str, n: int, workers: int, work: str, address: str | None, rounds: int,
            baselines: list[str]) -> dict:
    """Interleaved rounds of local, ray and each baseline's ray; medians and paired ratios."""
    variants = [("local", REPO, "local"), ("ray", REPO, "ray")]
    variants += [(f"ray@{ref}", tree_of(ref, work), "ray") for ref in baselines]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for _ in range(rounds):
        for name, tree, engine in variants:
            runs[name].append(run_once(tree, root, os.path.join(work, f"engine-{name}"), workers, engine, address))
    res: dict = {"stages": STAGES, "clips": n, "workers": workers, "cpu": os.cpu_count(), "rounds": rounds,
                 "ray_address": address, "runs": runs, "engines": {}}
    for name, _, _ in variants:
        rs = runs[name]
        entry = {k: _median(rs, k) for k in ("seconds", "clips_s", "first_clip_s", "steady_clips_s")}
        entry["pack_s"] = statistics.median(r["phase_seconds"]["pack"] for r in rs)
        entry["cpu_s"] = {k: statistics.median(r["cpu_s"][k] for r in rs) for k in rs[0]["cpu_s"]}
        if name != "local":
            pairs = list(zip(runs["local"], rs))
            entry["whole_run_ratio"] = statistics.median(b["seconds"] / a["seconds"] for a, b in pairs)
            entry["steady_state_ratio"] = statistics.median(a["steady_clips_s"] / b["steady_clips_s"] for a, b in pairs)
            entry["identical_shards"] = shard_bytes(os.path.join(work, f"engine-{name}")) == shard_bytes(os.path.join(work, "engine-local"))
        res["engines"][name] = entry
    return res


def render(res: dict) -> str:
    """The docs/benchmarks.md table of a ``compare`` result."""
    lines = ["| engine | whole run (s) | first clip (s) | steady state clips/s | pack (s) | CPU s: driver / workers / Ray runtime | whole-run ratio | steady-state ratio | shards identical |",
             "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for name, e in res["engines"].items():
        cpu = " / ".join(f"{e['cpu_s'][k]:.1f}" for k in ("driver", "workers", "ray_runtime"))
        ratios = ("—", "—", "—") if name == "local" else (f"{e['whole_run_ratio']:.2f}x", f"{e['steady_state_ratio']:.2f}x",
                                                          str(e["identical_shards"]).lower())
        lines.append(f"| {name} | {e['seconds']:.1f} | {e['first_clip_s']:.1f} | {e['steady_clips_s']:.1f} | {e['pack_s']:.2f} | {cpu} | "
                     + " | ".join(ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python bench/ray_engine.py FILE: the table of FILE's engine_ray
    data = json.load(open(sys.argv[1]))
    print(render(data.get("engine_ray", data)))
