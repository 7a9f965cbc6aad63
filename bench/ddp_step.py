#!/usr/bin/env python3
"""DDP step time before and after the loop wrapped forward + loss for DDP (issue 11).

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 bench/ddp_step.py --json bench/ddp_step.json

Two processes on CPU (gloo), one fixed synthetic batch per rank, the methods that trained
under DDP before the change. ``before``: DDP wraps the model and ``compute_loss`` gets the
wrapper (the old loop); ``after``: DDP wraps ``trainer.loop.LossStep`` (the loop now). Each
step is forward, loss, backward, ``after_backward``, optimizer step. Interleaved rounds, best
round per method and variant (a shared machine drifts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import load_config  # noqa: E402
from trainer.loop import LossStep, build_optimizer, build_run_model, seed_everything  # noqa: E402

# The methods that trained under DDP before the change (issue 11 lists the other 7 as crashing).
WORKED = ("multiloss", "mlb", "mslr", "mmpareto", "cggm", "miles", "mnl")


def synthetic_batch(batch: int, frames: int, image: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": {"audio": {"x": torch.randn(batch, 1, 128, 188, generator=g)},
                       "visual": {"x": torch.randn(batch, frames, 3, image, image, generator=g),
                                  "mask": torch.ones(batch, frames, dtype=torch.bool)}},
            "label": torch.randint(0, 6, (batch,), generator=g)}


def time_steps(method: str, variant: str, args: argparse.Namespace, rank: int) -> float:
    cfg = load_config(None, [f"balancing.name={method}", f"model.encoders.audio.width={args.width}",
                             f"model.encoders.visual.width={args.width}"])
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
    else:
        ddp = DDP(LossStep(model, balancer), find_unused_parameters=True)

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
    print("| method | before (ms/step) | after (ms/step) | change |\n|---|---|---|---|")
    for m, v in rows.items():
        print(f"| {m} | {v['before']:.1f} | {v['after']:.1f} | {v['change']:+.1%} |")
    ratios = [v["after"] / v["before"] for v in rows.values()]
    print(f"\ngeometric mean of after/before over {len(ratios)} methods: {math.prod(ratios) ** (1 / len(ratios)):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(WORKED))
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
    methods = [m for m in args.methods.split(",") if m]
    best: dict[str, dict[str, float]] = {m: {} for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            for variant in ("before", "after"):
                ms = time_steps(m, variant, args, rank)
                best[m][variant] = min(ms, best[m].get(variant, float("inf")))
    if rank == 0:
        rows = {m: {**v, "change": v["after"] / v["before"] - 1} for m, v in best.items()}
        print_table(rows)
        if args.json:
            setup = {k: getattr(args, k) for k in ("steps", "rounds", "batch", "width", "image", "frames")}
            doc = {"setup": {**setup, "world_size": dist.get_world_size(), "backend": "gloo",
                             "threads": torch.get_num_threads(), "torch": torch.__version__}, "ms_per_step": rows}
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
