"""The training loop: read it top to bottom.

    forward -> balancer.compute_loss -> backward -> balancer.after_backward -> clip -> step

Balancing methods plug in through their hooks (trainer/balancing/base.py) and never copy
this loop. One process per device under torchrun (DDP), or a single process on CPU/GPU.

What the loop calls lives beside it, one job per module, shared with ``cli.py evaluate`` and
the benchmarks: run_model.py (the model and method as a run trains them, and ``LossStep``,
what DDP wraps), optim.py (optimizer, schedule), eval_pass.py (one evaluation pass, the
probes), run_log.py (metrics.jsonl, TensorBoard), seeding.py, checkpoint.py, resume.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack, nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from avbalance import remote
from avbalance.errors import UserError
from avbalance.hub import weight_sources
from avbalance.progress import progress_bar, quiet
from trainer import distributed
from trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import save_config, validate_config
from trainer.corpus import apply_shard_set, shard_classes
from trainer.corrupt import CorruptLog
from trainer.loader import make_loader
from trainer.shard_index import preflight, read_index
from trainer.balancing.base import to_floats
from trainer.eval_pass import evaluate, probe_model, to_device
from trainer.model import compile_encoders
from trainer.optim import build_optimizer, build_schedule
from trainer.precise_bn import batch_norms, recompute_bn_stats
from trainer.predictions import save_predictions
from trainer.resume import resume_config
from trainer.run_lock import describe as describe_holder, hold_run_folder, holder
from trainer.run_log import MetricsLog, drop_records_after
from trainer.run_config import RunConfig
from trainer.run_model import LossStep, build_run_model, check_inputs
from trainer.seeding import seed_everything


def eval_part(index: dict, wanted: str) -> str:
    """The validation part, falling back to test for splits without one (ogm)."""
    return wanted if wanted in index["parts"] else "test"


def _load_resume_state(cfg: RunConfig, last_path: str, model, optimizer, schedule, balancer) -> dict:
    """Load the checkpoint into the freshly built run (in memory only); refuse a mismatch clearly."""
    ckpt = load_checkpoint(last_path)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        balancer.load_state_dict(ckpt["balancer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"--resume: the checkpoint {last_path} does not fit the config "
                        f"(balancing {cfg.balancing['name']}): {str(err).splitlines()[0]}") from None
    return ckpt


def stopped(state: dict, cfg: RunConfig) -> bool:
    """Training is over: every epoch done, or early stopping reached its patience."""
    patience = cfg.train.patience
    return state["epoch"] >= cfg.train.epochs or bool(patience and state["bad_epochs"] >= patience)


def _epoch_line(epoch: int, epochs: int, val: dict, val_part: str, loss: float | None, seconds: float) -> str:
    """The one line per epoch on stderr (main rank, unless quiet)."""
    heads = ", ".join(f"{m} {a:.3f}" for m, a in val["unimodal_accuracy"].items())
    shown = f", last train loss {loss:.4f}" if loss is not None else ""
    return (f"epoch {epoch + 1}/{epochs}: {val_part} accuracy {val['accuracy']:.3f} (heads: {heads}){shown}, "
            f"{seconds:.1f} s")


def train(cfg: dict, shards: str, out: str, resume: bool = False) -> dict:
    """Fit, validate every epoch, keep the best checkpoint, test it. Returns the test metrics.

    ``cfg`` is the config's dict form, as ``load_config`` returns it: checked here, resolved
    against the shard set (and the run's own, on resume) and saved as ``RUN/config.yaml``; the
    loop reads its typed view (``RunConfig``).

    Everything is checked (config, shards, checkpoint) before anything is written to ``out``:
    a command that fails leaves the run folder as it was. One process at a time trains a run
    folder: the main rank holds its lock (trainer/run_lock.py) from the first write to the end.
    """
    with ExitStack() as locks:
        return _train(cfg, shards, out, resume, locks)


def _train(raw: dict, shards: str, out: str, resume: bool, locks: ExitStack) -> dict:
    found = holder(out)  # another process trains this folder now: say so before anything else
    if found is not None:
        raise UserError(f"{describe_holder(out, found)}; wait for it to finish, or stop it")
    dist_info = distributed.setup(RunConfig.from_dict(raw).train.device)
    device = dist_info.device
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    if not resume and os.path.exists(last_path):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not os.path.exists(last_path):
        raise UserError(f"--resume: no checkpoint in {out} (last.pt)")
    validate_config(raw)
    check_inputs(raw)
    index = read_index(shards)  # read once: the class count, the parts and the class names below
    raw = apply_shard_set(raw, index, shards)  # class count and corpus defaults
    if resume:
        raw = resume_config(out, raw, shards)
    raw["data"]["shards"] = remote.canonical(shards)  # a URL stays a URL
    # The dict is saved as RUN/config.yaml; from here on the loop reads its typed view.
    cfg = RunConfig.from_dict(raw)
    dcfg = cfg.data
    # Cheap checks of every part it reads: shard sizes, clips missing from a part, exclusions.
    # (every part must exist, with its shards whole, before hours of training)
    val_part = eval_part(index, dcfg.val_part)
    for line in preflight(shards, [dcfg.train_part, val_part, dcfg.test_part], dcfg):
        if dist_info.main:
            print(line, file=sys.stderr, flush=True)
    corrupt_log = CorruptLog()  # damaged samples every loader of this run skips (data.on_corrupt=skip)

    # Data: one training loader for the run (its workers live across epochs, data.persistent_workers),
    # its stream seeded by (seed, rank, epoch) through set_epoch. Batches arrive on the device.
    train_loader, steps_per_epoch = make_loader(shards, dcfg.train_part, dcfg, train=True, rank=dist_info.rank,
                                                world_size=dist_info.world_size, seed=cfg.seed, device=device,
                                                corrupt_log=corrupt_log)

    # Model, balancing method, optimizer, schedule.
    seed_everything(cfg.seed + dist_info.rank, cfg.train.deterministic)
    model, balancer = build_run_model(cfg, device)
    optimizer = build_optimizer(cfg, balancer.param_groups(model, cfg.optim.lr))
    balancer.attach_optimizer(optimizer)  # methods with per-modality learning rates adjust it
    schedule = build_schedule(cfg, optimizer, steps_per_epoch * cfg.train.epochs)
    state = {"epoch": 0, "step": 0, "best_acc": -1.0, "best_epoch": -1, "bad_epochs": 0}
    if resume:
        ckpt = _load_resume_state(cfg, last_path, model, optimizer, schedule, balancer)
        set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        tested = os.path.join(out, f"eval_{dcfg.test_part}.json")
        if stopped(state, cfg) and os.path.exists(tested):  # nothing left to do: write nothing
            with open(tested, encoding="utf-8") as fh:
                finished = json.load(fh)
            distributed.cleanup()
            return {**finished, "already_finished": True, "stopped_early": state["epoch"] < cfg.train.epochs}

    # Every check passed: now the run folder may change, by this process alone.
    if dist_info.main:
        locks.enter_context(hold_run_folder(out))
        os.makedirs(out, exist_ok=True)
        save_config(raw, os.path.join(out, "config.yaml"))
        sources = weight_sources(model)  # pretrained weights: the id or path given and the file's sha256
        if sources:
            with open(os.path.join(out, "weights.json"), "w", encoding="utf-8") as fh:
                json.dump(sources, fh, indent=1, sort_keys=True)
        metrics_path = os.path.join(out, "metrics.jsonl")
        if resume:
            drop_records_after(metrics_path, state["step"], state["epoch"])
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)  # left by a run killed before its first checkpoint
    distributed.barrier()

    # bf16 autocast on CUDA; plain fp32 on CPU.
    use_bf16 = device.type == "cuda" and cfg.train.bf16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    if cfg.train.compile:
        compile_encoders(model)  # the encoders, in place: checkpoints and DDP see the same parameters
    step_fn = LossStep(model, balancer)
    # DDP wraps forward + loss (LossStep). Where a method leaves parameters without a gradient
    # (joint: the unimodal heads) or the model may skip some (Wav2Vec2's LayerDrop), DDP finds
    # them from the loss each step; the other methods skip that search (tests/test_ddp_unused.py).
    if dist_info.world_size > 1:
        step_fn = DDP(step_fn, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=balancer.unused_parameters or model.may_skip_parameters())

    log = MetricsLog(out, dist_info.main)
    n_classes = cfg.model.n_classes
    patience, epochs = cfg.train.patience, cfg.train.epochs
    chatty = dist_info.main and not quiet()
    val_loader, _ = make_loader(shards, val_part, dcfg, train=False, device=device,
                                corrupt_log=corrupt_log)  # deterministic: built once
    # Batch-norm statistics recomputed before each evaluation on the train part as evaluation
    # reads it (trainer/precise_bn.py): the moving averages of small batches mislead eval mode.
    bn_loader = None
    if cfg.train.precise_bn and batch_norms(model):
        bn_loader, _ = make_loader(shards, dcfg.train_part, dcfg, train=False, device=device,
                                   corrupt_log=corrupt_log)
    for epoch in range(state["epoch"], epochs):
        loader = train_loader
        loader.set_epoch(epoch)
        balancer.on_epoch_start(model, epoch, loader, val_loader)
        tick, seen, shown_loss = time.perf_counter(), 0, None
        correct = torch.zeros((), device=device)  # training-mode accuracy of the epoch, summed on the device (no sync per step)
        bar = progress_bar(steps_per_epoch, f"train epoch {epoch + 1}/{epochs}", unit="step") if chatty else None
        for batch in loader:
            batch = to_device(batch, device)
            with autocast():
                loss, held = step_fn(batch)
            out_, parts = held.out, held.parts
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Gradient modulation sees the synchronised gradients (DDP reduced them in backward).
            balancer.after_backward(model, out_, batch)
            if cfg.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            schedule.step()
            state["step"] += 1
            seen += batch["label"].shape[0] * dist_info.world_size
            correct += (out_.fused.detach().argmax(1) == batch["label"]).sum()
            if state["step"] % cfg.train.log_every == 0 or state["step"] == 1:
                if not torch.isfinite(loss):
                    raise UserError(f"the loss became {loss.item()} at step {state['step']}: lower optim.lr or enable optim.clip_grad")
                acc = (out_.fused.argmax(1) == batch["label"]).float().mean()
                record = {"kind": "train", "epoch": epoch, "step": state["step"], "loss": float(distributed.all_reduce_mean(loss.detach())),
                          "accuracy": float(distributed.all_reduce_mean(acc)), "lr": schedule.get_last_lr()[0],
                          "samples_per_s": seen / (time.perf_counter() - tick)}
                record.update(to_floats(parts))  # the loss's parts, read in one device sync
                record.update({k: float(v) for k, v in balancer.log().items()})
                log.write(record)
                shown_loss = record["loss"]
                if bar is not None:  # the values just logged: no extra device sync per step
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

        # Validate, let the method react, keep the best, stop early when it stops improving.
        train_batch_acc = float(distributed.all_reduce_mean(correct)) * dist_info.world_size / max(1, seen)
        if bn_loader is not None:
            recompute_bn_stats(model, bn_loader, cfg.train.precise_bn_batches, autocast)
        val = evaluate(model, val_loader, device, n_classes, autocast)
        balancer.on_epoch_end(model, epoch, val)
        log.write({"kind": "val", "epoch": epoch, "step": state["step"], "part": val_part, "accuracy": val["accuracy"],
                   "train_batch_accuracy": train_batch_acc,
                   "macro_f1": val["macro_f1"], "ece": val["ece"],
                   **{f"accuracy_{m}": a for m, a in val["unimodal_accuracy"].items()},
                   **{f"share_accuracy_{m}": a for m, a in val.get("share_accuracy", {}).items()}})
        if chatty:
            print(_epoch_line(epoch, epochs, val, val_part, shown_loss, time.perf_counter() - tick), file=sys.stderr, flush=True)
        improved = val["accuracy"] > state["best_acc"]
        if improved:
            state.update(best_acc=val["accuracy"], best_epoch=epoch, bad_epochs=0, best_train_batch_acc=train_batch_acc)
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
        if stopped(state, cfg):
            if chatty and state["epoch"] < epochs:
                print(f"early stop after epoch {state['epoch']}/{epochs}: no {val_part} improvement for {patience} epochs "
                      f"(train.patience); best epoch {state['best_epoch'] + 1}", file=sys.stderr, flush=True)
            break

    # Test the best checkpoint.
    model.load_state_dict(load_checkpoint(best_path)["model"])
    test_loader, _ = make_loader(shards, dcfg.test_part, dcfg, train=False, device=device,
                                 corrupt_log=corrupt_log)
    test_features: dict = {}
    test_predictions: dict = {}
    test = evaluate(model, test_loader, device, n_classes, autocast, features=test_features, predictions=test_predictions)
    test_part = dcfg.test_part
    if dist_info.main:  # the fused logits per clip: ensembles of runs are built from them (experiments/ensemble.py)
        save_predictions(os.path.join(out, f"logits_{test_part}.npz"), **test_predictions)
    train_metrics: dict = {}
    test["probe_accuracy"] = probe_model(model, shards, cfg, device, autocast, test_part, test_features,
                                         os.path.join(out, f"probe_{test_part}.npz") if dist_info.main else None,
                                         train_metrics, corrupt_log=corrupt_log)
    # The tested model on its own train part, in evaluation mode, beside its training-mode
    # accuracy in the same epoch: a large gap means evaluation does not use what was learnt.
    test["train_accuracy"] = train_metrics.get("accuracy")
    test["train_batch_accuracy"] = state.get("best_train_batch_acc")
    # Damaged samples skipped (data.on_corrupt=skip), over every rank: a result to read with care.
    skipped = int(round(float(distributed.all_reduce_mean(torch.tensor(float(corrupt_log.count), device=device))) * dist_info.world_size))
    test.update(best_epoch=state["best_epoch"], best_val_accuracy=state["best_acc"], val_part=val_part, skipped_corrupt=skipped,
                classes=shard_classes(index))  # the confusion's row and column names
    if dist_info.main:
        log.write({"kind": "test", "epoch": state["best_epoch"], "step": state["step"], "accuracy": test["accuracy"],
                   "macro_f1": test["macro_f1"], "skipped_corrupt": skipped, "train_accuracy": test["train_accuracy"],
                   "train_batch_accuracy": test["train_batch_accuracy"],
                   **{f"accuracy_{m}": a for m, a in test["unimodal_accuracy"].items()},
                   "probe_accuracy": test["probe_accuracy"]})
        with open(os.path.join(out, f"eval_{test_part}.json"), "w", encoding="utf-8") as fh:
            json.dump(test, fh, indent=2)
    log.close()
    distributed.cleanup()
    return test
