"""The optimizer and its learning-rate schedule, as ``optim.*`` in the config asks.

Both take the run config typed (``RunConfig``) or in its dict form (keys left out take their
defaults), and read its ``optim`` section."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from trainer.run_config import RunConfig, as_run_config


def build_optimizer(cfg: RunConfig | Mapping[str, Any], groups: list[dict]) -> torch.optim.Optimizer:
    o = as_run_config(cfg).optim
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    # optim.name is one of these three: trainer/config.py RULES checked it when the config was read.
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_schedule(cfg: RunConfig | Mapping[str, Any], optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant or cosine decay, as a multiplier of each group's lr.

    A group's ``"lr_scale"`` (default 1) multiplies its rate on top: methods with
    per-modality learning rates (MSLR, MILES) set it, and the schedule keeps honouring it.
    """
    o = as_run_config(cfg).optim  # optim.schedule is none or cosine: RULES checked it
    warmup = o.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def for_group(i: int):
        # Looked up at every step: loading an optimizer state replaces the group dicts.
        return lambda step: factor(step) * optimizer.param_groups[i].get("lr_scale", 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [for_group(i) for i in range(len(optimizer.param_groups))])
