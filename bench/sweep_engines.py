#!/usr/bin/env python3
"""The Ray sweep engine against the local one (issue 23): the same tiny runs, one invocation.

    python bench/sweep_engines.py --json /tmp/sweep_engines.json

Both engines run the same tiny runs (two methods x two seeds by default) one at a time
(``--jobs 1``; Ray: a local runtime of one CPU, a task of one CPU per run), in this process
through ``run_sweep``, so that every second is attributed:

- a run's time: its train process from start to exit, as ``start_run`` measures it for every
  engine (the same train command, the same data);
- per-run overhead: (the engine's run phase - the runs' train time) / runs: what starting,
  watching and reporting a run costs besides its train process (local: a thread, the folder's
  lock, a Popen; Ray: the task's dispatch to a worker, its result, the driver's polling);
- Ray's fixed cost, once per sweep: starting the local runtime (``ray.init``) and shutting it
  down, apart from the runs.

Each as seconds and as a ratio to the mean run time. ``--rounds`` alternates local and Ray
(a busy machine slows both alike); the result is each figure's median over the rounds. The
runs' test accuracies must agree between the engines (``same_accuracies``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("AVBALANCE_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per run: the same numbers from both engines
os.environ.pop("RAY_ADDRESS", None)  # a local runtime, never another cluster

TINY = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
        "data.batch_size=8", "data.workers=0", "data.samples_per_epoch=16", "train.patience=0"]
TARGET = 0.05  # issue 23: Ray's per-run overhead at most 5 % of a run's time


def build_shards(work: str) -> str:
    """A synthetic shard set (6 actors x 3 sentences, the ``ogm`` split; frames and audio)."""
    corpus, out = os.path.join(work, "corpus"), os.path.join(work, "pre")
    cli = [sys.executable, os.path.join(REPO, "cli.py")]
    shards = os.path.join(out, "shards", "ogm")
    if not os.path.exists(os.path.join(shards, "shards.json")):
        if not os.path.exists(os.path.join(corpus, "synth.json")):
            subprocess.run([*cli, "synth", "cremad", "--out", corpus, "--actors", "6", "--sentences", "3", "--seed", "11",
                            "--audio-signal", "1.0", "--video-signal", "1.0"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*cli, "preprocess", "cremad", "--root", corpus, "--out", out, "--split", "ogm",
                        "--stages", "frames,audio,pack", "--workers", "2"], check=True, stdout=subprocess.DEVNULL)
    return shards


def sweep_file(work: str, shards: str, seeds: int, epochs: int) -> str:
    import yaml

    doc = {"out": os.path.join(work, "runs"), "shards": os.path.join(os.path.dirname(shards), "{split}"),
           "set": [*TINY, f"train.epochs={epochs}"],
           "blocks": [{"name": "b", "preset": "resnet", "splits": [os.path.basename(shards)], "seeds": list(range(seeds)),
                       "methods": ["joint", "mlb"], "fusions": ["late_linear"]}]}
    path = os.path.join(work, "sweep.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh)
    return path


def timed_sweep(path: str, out: str, engine_name: str) -> dict[str, Any]:
    """One sweep into ``out`` on the engine, its phases timed."""
    from experiments.engines import EngineOptions, make_engine
    from experiments.sweep import load_sweep, run_sweep

    sweep = load_sweep(path, out=out)
    engine = make_engine(engine_name, EngineOptions(jobs=1), sweep)
    phases: dict[str, float] = {}
    ends: list[float] = []
    start, run, close = engine.start, engine.run, engine.close

    def timed(name: str, fn):
        def call(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                phases.setdefault(name, time.perf_counter() - t)  # the first call (run starts an engine already started)
        return call

    engine.start = timed("start", start)
    engine.close = timed("shutdown", close)
    engine.run = timed("run", lambda tasks, started, ended: run(tasks, started, lambda t, e: (ends.append(e.seconds), ended(t, e))))
    t = time.perf_counter()
    records = run_sweep(sweep, engine=engine, report=lambda line: None, progress=lambda line: None)
    total = time.perf_counter() - t
    failed = [r["id"] for r in records.values() if r.get("status") != "done"]
    if failed:
        raise SystemExit(f"{engine_name}: runs did not finish: {failed}; see their train.log under {out}")
    run_s = statistics.mean(ends)
    per_run = (phases["run"] - sum(ends)) / len(ends)
    return {"sweep_s": round(total, 3), "start_s": round(phases.get("start", 0.0), 3),
            "shutdown_s": round(phases.get("shutdown", 0.0), 3), "run_phase_s": round(phases["run"], 3),
            "run_s": round(run_s, 3), "per_run_overhead_s": round(per_run, 3),
            "accuracies": {k: r["accuracy"] for k, r in sorted(records.items())}}


def median(rounds: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in rounds), 3)


def summarise(local: list[dict], ray: list[dict], runs: int) -> dict[str, Any]:
    run_s = statistics.median([r["run_s"] for r in local + ray])
    fixed = [r["start_s"] + r["shutdown_s"] for r in ray]
    extra = [r["per_run_overhead_s"] - l["per_run_overhead_s"] for r, l in zip(ray, local)]
    out = {
        "runs": runs, "rounds": len(local), "run_s": round(run_s, 3),
        "local": {k: median(local, k) for k in ("sweep_s", "run_phase_s", "per_run_overhead_s")},
        "ray": {k: median(ray, k) for k in ("sweep_s", "start_s", "shutdown_s", "run_phase_s", "per_run_overhead_s")},
    }
    out["local"]["per_run_overhead_ratio"] = round(out["local"]["per_run_overhead_s"] / run_s, 4)
    out["ray"].update(fixed_s=round(statistics.median(fixed), 3), fixed_ratio=round(statistics.median(fixed) / run_s, 3),
                      per_run_overhead_ratio=round(out["ray"]["per_run_overhead_s"] / run_s, 4),
                      extra_per_run_over_local_s=round(statistics.median(extra), 3),
                      extra_per_run_over_local_ratio=round(statistics.median(extra) / run_s, 4))
    out["target_per_run_ratio"] = TARGET
    out["meets_target"] = out["ray"]["per_run_overhead_ratio"] <= TARGET
    out["same_accuracies"] = all(r["accuracies"] == local[0]["accuracies"] for r in local + ray)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="a shard set folder to train on (default: a synthetic one built in --work)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per method, two methods: 2 x seeds runs (default 2)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    ap.add_argument("--rounds", type=int, default=1, help="local then Ray, this many times; medians reported (default 1)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "avbalance-bench-sweep-engines"),
                    help="working folder: the synthetic shards (kept) and the runs (removed) (default: in the temp folder)")
    ap.add_argument("--json", help="also write the result to this file (default: printed only)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    shards = os.path.abspath(args.shards) if args.shards else build_shards(args.work)
    path = sweep_file(args.work, shards, args.seeds, args.epochs)
    local: list[dict] = []
    ray: list[dict] = []
    try:
        for i in range(args.rounds):
            for name, into in (("local", local), ("ray", ray)):
                out = os.path.join(args.work, f"runs-{name}-{i}")
                shutil.rmtree(out, ignore_errors=True)
                into.append(timed_sweep(path, out, name))
                print(f"round {i + 1}/{args.rounds} {name}: {json.dumps({k: v for k, v in into[-1].items() if k != 'accuracies'})}",
                      file=sys.stderr, flush=True)
    finally:
        for name in os.listdir(args.work):
            if name.startswith("runs-"):
                shutil.rmtree(os.path.join(args.work, name), ignore_errors=True)
    result = summarise(local, ray, 2 * args.seeds)
    result["machine"] = {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2), "omp_threads": os.environ["OMP_NUM_THREADS"]}
    result["command"] = " ".join(["python", "bench/sweep_engines.py", *sys.argv[1:]])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
