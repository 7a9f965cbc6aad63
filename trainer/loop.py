"""The training loop: read it top to bottom.

    forward -> balancer.compute_loss -> backward -> balancer.after_backward -> clip -> step

Balancing methods plug in through their hooks (trainer/balancing/base.py) and never copy
this loop. One process per device under torchrun (DDP), or a single process on CPU/GPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from avbalance.errors import UserError
from trainer import distributed
from trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import save_config
from trainer.data import SKIPPED, DataConfig, make_loader, preflight, read_index
from trainer.metrics import summarize
from trainer.model import build_model


def data_config(cfg: dict) -> DataConfig:
    d = cfg["data"]
    return DataConfig(
        modalities=dict(d["modalities"]), batch_size=d["batch_size"], workers=d["workers"],
        shuffle_buffer=d["shuffle_buffer"], frames=d["frames"], image_size=d["image_size"],
        max_face_frames=d["max_face_frames"], max_wav_seconds=d["max_wav_seconds"],
        samples_per_epoch=d["samples_per_epoch"],
        exclude_quality=tuple(d.get("exclude_quality") or ()), on_corrupt=d.get("on_corrupt", "error"),
    )


# Which shard source each encoder reads.
ENCODER_SOURCES = {"resnet18_audio": "spec", "resnet18_visual": "frames", "face_conformer": "face_feats", "wav2vec2_conformer": "wav"}


def check_inputs(cfg: dict) -> None:
    """The data must feed every encoder, with the input that encoder reads."""
    sources, encoders = cfg["data"]["modalities"], cfg["model"]["encoders"]
    if set(sources) != set(encoders):
        raise UserError(f"data.modalities {sorted(sources)} and model.encoders {sorted(encoders)} must name the same modalities")
    for m, spec in encoders.items():
        wanted = ENCODER_SOURCES.get(spec.get("name"))
        if wanted and sources[m] != wanted:
            raise UserError(f"modality {m!r}: encoder {spec['name']} reads {wanted!r}, but data.modalities.{m} is {sources[m]!r}")


def eval_part(shards: str, wanted: str) -> str:
    """The validation part, falling back to test for splits without one (ogm)."""
    parts = read_index(shards)["parts"]
    return wanted if wanted in parts else "test"


def build_optimizer(cfg: dict, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg["optim"]
    if o["name"] == "adam":
        return torch.optim.Adam(groups, lr=o["lr"], weight_decay=o["weight_decay"])
    if o["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=o["lr"], weight_decay=o["weight_decay"])
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    raise UserError(f"optim.name must be adam, adamw or sgd, not {o['name']!r}")


def build_schedule(cfg: dict, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant or cosine decay, as a multiplier of each group's lr.

    A group's ``"lr_scale"`` (default 1) multiplies its rate on top: methods with
    per-modality learning rates (MSLR, MILES) set it, and the schedule keeps honouring it.
    """
    o = cfg["optim"]
    if o["schedule"] not in ("none", "cosine"):
        raise UserError(f"optim.schedule must be none or cosine, not {o['schedule']!r}")
    warmup = o["warmup_steps"]

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if o["schedule"] == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def for_group(i: int):
        # Looked up at every step: loading an optimizer state replaces the group dicts.
        return lambda step: factor(step) * optimizer.param_groups[i].get("lr_scale", 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [for_group(i) for i in range(len(optimizer.param_groups))])


def to_device(batch: dict, device: torch.device) -> dict:
    inputs = {m: {k: v.to(device, non_blocking=True) for k, v in d.items()} for m, d in batch["inputs"].items()}
    return {**batch, "inputs": inputs, "label": batch["label"].to(device, non_blocking=True)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, n_classes: int, autocast) -> dict:
    """Metrics over a whole part, gathered from every rank."""
    core = model.module if isinstance(model, DDP) else model
    core.eval()
    # A decomposable head (late_linear) also gives each modality's share of the fused logits:
    # how much the fused classifier itself relies on it, whether or not its head is trained.
    decomposable = getattr(core.fusion, "decomposable", False)
    labels, fused, uni, share = [], [], {m: [] for m in core.modalities}, {m: [] for m in core.modalities}
    for batch in loader:
        batch = to_device(batch, device)
        with autocast():
            out = core(batch["inputs"])
            parts = core.fusion.per_modality_logits(out.features, split_bias=True) if decomposable else {}
        labels.append(batch["label"])
        fused.append(out.fused.float())
        for m in uni:
            uni[m].append(out.unimodal[m].float())
            if decomposable:
                share[m].append(parts[m].float())
    core.train()
    empty = torch.zeros(0, n_classes, device=device)
    cat = lambda xs, e: distributed.gather_rows(torch.cat(xs) if xs else e).cpu().numpy()  # noqa: E731
    y = cat(labels, torch.zeros(0, dtype=torch.long, device=device))
    shares = {m: cat(v, empty) for m, v in share.items()} if decomposable else None
    return summarize(y, cat(fused, empty), {m: cat(v, empty) for m, v in uni.items()}, n_classes, share_logits=shares)


class MetricsLog:
    """metrics.jsonl and TensorBoard, written by rank 0 only."""

    def __init__(self, out: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def drop_records_after(path: str, step: int, epoch: int) -> None:
    """Forget what a killed run logged after its last checkpoint: a resumed run logs it again."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [ln for ln in fh if ln.strip()]
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if rec.get("step", 0) <= step and rec.get("epoch", 0) < epoch:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    if len(keep) != len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(path + ".tmp", path)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def train(cfg: dict, shards: str, out: str, resume: bool = False) -> dict:
    """Fit, validate every epoch, keep the best checkpoint, test it. Returns the test metrics."""
    from trainer.balancing import build_balancer

    dist_info = distributed.setup(cfg["train"]["device"])
    device = dist_info.device
    os.makedirs(out, exist_ok=True)
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    if not resume and os.path.exists(last_path):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not os.path.exists(last_path):
        raise UserError(f"--resume: no checkpoint in {out} (last.pt)")
    check_inputs(cfg)
    # Cheap checks of every part it reads: shard sizes, clips missing from a part, exclusions.
    dcfg = data_config(cfg)
    parts = [cfg["data"]["train_part"], eval_part(shards, cfg["data"]["val_part"]), cfg["data"]["test_part"]]
    for line in preflight(shards, parts, dcfg):
        if dist_info.main:
            print(line, file=sys.stderr, flush=True)
    SKIPPED.records.clear()
    cfg["data"]["shards"] = os.path.abspath(shards)
    if dist_info.main:
        save_config(cfg, os.path.join(out, "config.yaml"))
    seed_everything(cfg["seed"] + dist_info.rank, cfg["train"]["deterministic"])

    # Data: the loaders are rebuilt per epoch, seeded by (seed, rank, epoch).
    val_part = eval_part(shards, cfg["data"]["val_part"])
    _, steps_per_epoch = make_loader(shards, cfg["data"]["train_part"], dcfg, train=True, rank=dist_info.rank,
                                     world_size=dist_info.world_size, seed=cfg["seed"])

    # Model, balancing method, optimizer, schedule.
    model = build_model(cfg["model"]).to(device)
    balancing = dict(cfg["balancing"])
    balancer = build_balancer(balancing.pop("name"), model, **balancing)
    optimizer = build_optimizer(cfg, balancer.param_groups(model, cfg["optim"]["lr"]))
    balancer.attach_optimizer(optimizer)  # methods with per-modality learning rates adjust it
    schedule = build_schedule(cfg, optimizer, steps_per_epoch * cfg["train"]["epochs"])
    # bf16 autocast on CUDA; plain fp32 on CPU.
    use_bf16 = device.type == "cuda" and cfg["train"]["bf16"]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    # Unused parameters are normal here: joint training leaves the unimodal heads without a loss.
    ddp = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
           if dist_info.world_size > 1 else None)

    state = {"epoch": 0, "step": 0, "best_acc": -1.0, "best_epoch": -1, "bad_epochs": 0}
    if resume:
        ckpt = load_checkpoint(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        balancer.load_state_dict(ckpt["balancer"])
        set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        if dist_info.main:
            drop_records_after(os.path.join(out, "metrics.jsonl"), state["step"], state["epoch"])

    log = MetricsLog(out, dist_info.main)
    n_classes = cfg["model"]["n_classes"]
    patience = cfg["train"]["patience"]
    val_loader, _ = make_loader(shards, val_part, dcfg, train=False)  # deterministic: built once
    for epoch in range(state["epoch"], cfg["train"]["epochs"]):
        loader, _ = make_loader(shards, cfg["data"]["train_part"], dcfg, train=True, rank=dist_info.rank,
                                world_size=dist_info.world_size, seed=cfg["seed"], epoch=epoch)
        balancer.on_epoch_start(model, epoch, loader, val_loader)
        tick, seen = time.perf_counter(), 0
        for batch in loader:
            batch = to_device(batch, device)
            with autocast():
                out_ = (ddp or model)(batch["inputs"])
                loss, parts = balancer.compute_loss(ddp or model, batch, out_)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Gradient modulation sees the synchronised gradients (DDP reduced them in backward).
            balancer.after_backward(model, out_, batch)
            if cfg["optim"]["clip_grad"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["optim"]["clip_grad"])
            optimizer.step()
            schedule.step()
            state["step"] += 1
            seen += batch["label"].shape[0] * dist_info.world_size
            if state["step"] % cfg["train"]["log_every"] == 0 or state["step"] == 1:
                if not torch.isfinite(loss):
                    raise UserError(f"the loss became {loss.item()} at step {state['step']}: lower optim.lr or enable optim.clip_grad")
                acc = (out_.fused.argmax(1) == batch["label"]).float().mean()
                record = {"kind": "train", "epoch": epoch, "step": state["step"], "loss": float(distributed.all_reduce_mean(loss.detach())),
                          "accuracy": float(distributed.all_reduce_mean(acc)), "lr": schedule.get_last_lr()[0],
                          "samples_per_s": seen / (time.perf_counter() - tick)}
                record.update({k: float(v) for k, v in parts.items()})
                record.update({k: float(v) for k, v in balancer.log().items()})
                log.write(record)

        # Validate, let the method react, keep the best, stop early when it stops improving.
        val = evaluate(ddp or model, val_loader, device, n_classes, autocast)
        balancer.on_epoch_end(model, epoch, val)
        log.write({"kind": "val", "epoch": epoch, "step": state["step"], "part": val_part, "accuracy": val["accuracy"],
                   "macro_f1": val["macro_f1"], "ece": val["ece"],
                   **{f"accuracy_{m}": a for m, a in val["unimodal_accuracy"].items()},
                   **{f"share_accuracy_{m}": a for m, a in val.get("share_accuracy", {}).items()}})
        improved = val["accuracy"] > state["best_acc"]
        if improved:
            state.update(best_acc=val["accuracy"], best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if dist_info.main:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "balancer": balancer.state_dict(), "rng": rng_state(), "state": dict(state)}
            if improved:
                save_checkpoint(best_path, ckpt)
            save_checkpoint(last_path, ckpt)  # written last: resume continues after this epoch
        distributed.barrier()
        if patience and state["bad_epochs"] >= patience:
            break

    # Test the best checkpoint.
    model.load_state_dict(load_checkpoint(best_path)["model"])
    test_loader, _ = make_loader(shards, cfg["data"]["test_part"], dcfg, train=False)
    test = evaluate(ddp or model, test_loader, device, n_classes, autocast)
    # Damaged samples skipped (data.on_corrupt=skip), over every rank: a result to read with care.
    skipped = int(round(float(distributed.all_reduce_mean(torch.tensor(float(SKIPPED.count), device=device))) * dist_info.world_size))
    test.update(best_epoch=state["best_epoch"], best_val_accuracy=state["best_acc"], val_part=val_part, skipped_corrupt=skipped)
    if dist_info.main:
        log.write({"kind": "test", "epoch": state["best_epoch"], "step": state["step"], "accuracy": test["accuracy"],
                   "macro_f1": test["macro_f1"], "skipped_corrupt": skipped,
                   **{f"accuracy_{m}": a for m, a in test["unimodal_accuracy"].items()}})
        with open(os.path.join(out, f"eval_{cfg['data']['test_part']}.json"), "w", encoding="utf-8") as fh:
            json.dump(test, fh, indent=2)
    log.close()
    distributed.cleanup()
    return test
