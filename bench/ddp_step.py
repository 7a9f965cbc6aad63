#!/usr/bin/env python3
"""DDP step time before and after the loop wrapped forward + loss for DDP (issue 11); or, with
``--find-unused both``, with DDP's ``find_unused_parameters`` on and off (issue 26).

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 bench/ddp_step.py --json bench/ddp_step.json
    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 bench/ddp_step.py \
        --find-unused both --json bench/ddp_find_unused.json

Two processes on CPU (gloo), one fixed synthetic batch per rank. Default: the methods that
trained under DDP before the change. ``before``: DDP wraps the model and ``compute_loss`` gets
the wrapper (the old loop); ``after``: DDP wraps ``trainer.run_model.LossStep`` (the loop now),
both with ``find_unused_parameters=True``. ``--find-unused both``: DDP wraps ``LossStep`` with
``find_unused_parameters`` True, then False, for the methods whose every step gives every
parameter a gradient (``unused_parameters`` False: the loop now passes False for them). Each
step is forward, loss, backward, ``after_backward``, optimizer step. Interleaved rounds, best
round per method and variant (a shared machine drifts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.balancing import BALANCERS  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.run_model import LossStep, build_run_model  # noqa: E402
from trainer.seeding import seed_everything  # noqa: E402

# The methods that trained under DDP before the change (issue 11 lists the other 7 as crashing).
WORKED = ("multiloss", "mlb", "mslr", "mmpareto", "cggm", "miles", "mnl")


def synthetic_batch(batch: int, frames: int, image: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": {"audio": {"x": torch.randn(batch, 1, 128, 188, generator=g)},
                       "visual": {"x": torch.randn(batch, frames, 3, image, image, generator=g),
                                  "mask": torch.ones(batch, frames, dtype=torch.bool)}},
            "label": torch.randint(0, 6, (batch,), generator=g)}


def bench_config(method: str, args: argparse.Namespace) -> dict:
    return load_config(None, [f"balancing.name={method}", f"model.encoders.audio.width={args.width}",
                              f"model.encoders.visual.width={args.width}", "model.n_classes=6"])  # the batch's labels


def may_drop_find_unused(method: str, args: argparse.Namespace) -> bool:
    """The loop wraps this method without ``find_unused_parameters`` (its flag and the model's)."""
    model, balancer = build_run_model(bench_config(method, args))
    return not (balancer.unused_parameters or model.may_skip_parameters())


VARIANTS = {"true": ("before", "after"), "both": ("find_unused", "no_find_unused")}


def time_steps(method: str, variant: str, args: argparse.Namespace, rank: int) -> float:
    cfg = bench_config(method, args)
    seed_everything(0, deterministic=False)
    model, balancer = build_run_model(cfg)
    optimizer = build_optimizer(cfg, balancer.param_groups(model, 1e-4))
    balancer.attach_optimizer(optimizer)
    batch = synthetic_batch(args.batch, args.frames, args.image, seed=rank)
    if variant == "before":
        ddp = DDP(model, find_unused_parameters=True)

        def forward():
            out = ddp(batch["inputs"])
            return balancer.compute_loss(ddp, batch, out)[0], out
    else:  # after, find_unused, no_find_unused: the loop's wrap
        ddp = DDP(LossStep(model, balancer), find_unused_parameters=variant != "no_find_unused")

        def forward():
            loss, held = ddp(batch)
            return loss, held.out
    start = 0.0
    for i in range(args.steps + 2):  # 2 warm-up steps
        if i == 2:
            dist.barrier()
            start = time.perf_counter()
        loss, out = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        balancer.after_backward(model, out, batch)
        optimizer.step()
    dist.barrier()
    return (time.perf_counter() - start) / args.steps * 1000


def print_table(rows: dict[str, dict[str, float]]) -> None:
    """The markdown table docs/benchmarks.md shows."""
    first, second = VARIANTS["both" if any("find_unused" in v for v in rows.values()) else "true"]
    names = {"before": "before", "after": "after", "find_unused": "find_unused_parameters=True",
             "no_find_unused": "find_unused_parameters=False"}
    print(f"| method | {names[first]} (ms/step) | {names[second]} (ms/step) | change |\n|---|---|---|---|")
    for m, v in rows.items():
        print(f"| {m} | {v[first]:.1f} | {v[second]:.1f} | {v['change']:+.1%} |")
    ratios = [v[second] / v[first] for v in rows.values()]
    print(f"\ngeometric mean of {second}/{first} over {len(ratios)} methods: {math.prod(ratios) ** (1 / len(ratios)):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", help=f"comma-separated (default: {','.join(WORKED)}; with --find-unused both, "
                    "every registered method the loop wraps without find_unused_parameters)")
    ap.add_argument("--find-unused", choices=sorted(VARIANTS), default="true",
                    help="true: before/after the LossStep wrap, both finding unused parameters (issue 11); "
                         "both: the LossStep wrap with find_unused_parameters True and False")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="samples per rank")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--json", help="write the results here (rank 0)")
    ap.add_argument("--show", metavar="JSON", help="print the table of a saved result and stop (no torchrun needed)")
    args = ap.parse_args()
    if args.show:
        with open(args.show, encoding="utf-8") as fh:
            print_table(json.load(fh)["ms_per_step"])
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    variants = VARIANTS[args.find_unused]
    if args.methods:
        methods = [m for m in args.methods.split(",") if m]
    else:
        methods = list(WORKED) if args.find_unused == "true" else [m for m in BALANCERS.names() if may_drop_find_unused(m, args)]
    if args.find_unused == "both":
        refused = [m for m in methods if not may_drop_find_unused(m, args)]
        if refused:  # without it DDP would fail on the second step
            ap.error(f"{', '.join(refused)} leave parameters without a gradient: they need find_unused_parameters")
    best: dict[str, dict[str, float]] = {m: {} for m in methods}
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in methods}  # every round's times, paired
    for _ in range(args.rounds):
        for m in methods:
            rounds[m].append({})
            for variant in variants:
                ms = time_steps(m, variant, args, rank)
                rounds[m][-1][variant] = ms
                best[m][variant] = min(ms, best[m].get(variant, float("inf")))
    if rank == 0:
        rows = {m: {**v, "change": v[variants[1]] / v[variants[0]] - 1} for m, v in best.items()}
        print_table(rows)
        # The two variants of a round ran back to back: their ratio drifts less than the best rounds'.
        paired = {m: statistics.median(r[variants[1]] / r[variants[0]] for r in rs) - 1 for m, rs in rounds.items()}
        print("median over rounds of the paired change: " + ", ".join(f"{m} {c:+.1%}" for m, c in paired.items()))
        if args.json:
            setup = {k: getattr(args, k) for k in ("steps", "rounds", "batch", "width", "image", "frames", "find_unused")}
            doc = {"setup": {**setup, "world_size": dist.get_world_size(), "backend": "gloo",
                             "threads": torch.get_num_threads(), "torch": torch.__version__}, "ms_per_step": rows,
                   "paired_median_change": paired, "rounds_ms_per_step": rounds}
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
