"""``cli.py evaluate``: the best checkpoint of a run on one part of its shards (eval_<part>.json,
probe_<part>.npz, logits_<part>.npz)."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

import torch
import yaml

from avbalance.errors import UserError
from trainer.checkpoint import load_checkpoint
from trainer.corpus import shard_classes
from trainer.corrupt import CorruptLog
from trainer.eval_pass import evaluate, probe_model
from trainer.loader import make_loader
from trainer.predictions import save_predictions
from trainer.resume import with_old_defaults
from trainer.run_config import RunConfig
from trainer.run_model import build_run_model
from trainer.shard_index import read_index


def evaluate_run(run: str, part: str = "test", shards: str | None = None, checkpoint: str = "best") -> dict:
    """Metrics of ``run``'s best (or last) checkpoint on ``part``, with the linear probes (fit on
    the run's train part, scored on ``part``; features in probe_<part>.npz); written to eval_<part>.json."""
    cfg_path = os.path.join(run, "config.yaml")
    ckpt_path = os.path.join(run, f"{checkpoint}.pt")
    if not os.path.exists(cfg_path) or not os.path.exists(ckpt_path):
        raise UserError(f"{run} is not a finished run directory (needs config.yaml and {checkpoint}.pt)")
    with open(cfg_path, encoding="utf-8") as fh:
        cfg = RunConfig.from_dict(with_old_defaults(yaml.safe_load(fh)))
    shards = shards or cfg.data.shards
    model, _ = build_run_model(cfg)  # as trained: the method's configure may change the model
    model.load_state_dict(load_checkpoint(ckpt_path)["model"])
    skipped = CorruptLog()  # damaged samples of ``part`` skipped (data.on_corrupt=skip)
    loader, _ = make_loader(shards, part, cfg.data, train=False, corrupt_log=skipped)
    features: dict = {}
    predictions: dict = {}
    metrics = evaluate(model, loader, torch.device("cpu"), cfg.model.n_classes, nullcontext, features=features,
                       predictions=predictions)
    if shards == cfg.data.shards:  # another shard set's logits must not pose as the run's own
        save_predictions(os.path.join(run, f"logits_{part}.npz"), **predictions)
    metrics["skipped_corrupt"] = skipped.count
    # The probes learn from the run's own train part, even when --shards evaluates on another set.
    train_metrics: dict = {}
    metrics["probe_accuracy"] = probe_model(model, cfg.data.shards or shards, cfg,
                                            torch.device("cpu"), nullcontext, part, features,
                                            os.path.join(run, f"probe_{part}.npz"), train_metrics)
    metrics["train_accuracy"] = train_metrics.get("accuracy")  # the same checkpoint on its train part, eval mode
    metrics.update(part=part, checkpoint=checkpoint, shards=shards, classes=shard_classes(read_index(shards)))
    with open(os.path.join(run, f"eval_{part}.json"), "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    return metrics
