"""Batch-norm statistics recomputed on the training part before an evaluation (``train.precise_bn``).

A batch-norm layer normalises with the batch's own mean and variance while training, and with
its running averages in evaluation mode. Those averages are an exponential moving average
(momentum 0.1) of the last few training batches: with small batches (16 clips) and weights
that still move, they are a noisy estimate of statistics that no longer hold, and the error
compounds over the ~20 batch-norm layers of a ResNet-18. The model then predicts much worse
in evaluation mode than in training mode, on the very clips it trained on (measured in
docs/methods.md, "Parity with the reference code": OGM-GE's SGD recipe, eval-mode accuracy
on the train part at chance while training batches were 40-50 % correct).

The remedy the field uses (``torch.optim.swa_utils.update_bn``, fvcore's precise BN,
Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): with the weights frozen, run the
model in training mode over many batches and set each layer's statistics to their plain
average (``momentum=None``). Here the batches are the training part as evaluation reads it
(no augmentation, a fixed order): the statistics then describe the inputs the model is
evaluated on, they are the same for the same weights, and the training stream and its
random draws are untouched (a resumed run replays the same epochs). Under DDP each rank
averages over its share of the part and the ranks' statistics are averaged, weighted by the
batches each used (a rank with none counts for nothing), so every replica keeps identical
buffers. A batch of one sample is skipped (batch norm needs two values per channel). The pass
runs under the evaluation's autocast, so the statistics describe the activations evaluation
sees. Methods whose training runs eval-mode forwards (AGM's coalitions, PMR's prototypes,
relearning's features) see the recomputed statistics there too.

Models without batch norm (the Conformer presets use LayerNorm) skip the pass entirely.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from trainer import distributed


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _restore(layers: list, saved: list) -> None:
    for m, (_momentum, mean, var, count) in zip(layers, saved):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[dict], max_batches: int | None = None,
                       autocast: Callable[[], ContextManager] = nullcontext) -> int:
    """Set every batch-norm layer's running mean and variance to their average over ``batches``
    (at most ``max_batches``; None: all), forwarding ``batch["inputs"]`` in training mode with
    no gradient, under ``autocast``. Returns the number of batches used (over every rank); with
    none, or on an error, the statistics stay as they were. The model's train/eval mode is restored."""
    layers = batch_norms(model)
    if not layers:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, each batch weighted equally
    model.train()
    used = 0
    try:
        for batch in itertools.islice(batches, max_batches):
            if int(batch["label"].shape[0]) < 2:
                continue  # one sample: no variance to take (and batch norm refuses it)
            with autocast():
                model(batch["inputs"])
            used += 1
    except BaseException:
        _restore(layers, saved)
        raise
    finally:
        model.train(was_training)
        for m, (momentum, *_rest) in zip(layers, saved):
            m.momentum = momentum
    device = layers[0].running_mean.device
    # Each rank's averages weighted by its batches: sum_r used_r * stat_r / sum_r used_r.
    world = distributed.world_size()
    total = float(distributed.all_reduce_mean(torch.tensor(float(used), device=device))) * world
    if total == 0:  # no rank saw a batch: keep the statistics trained with
        _restore(layers, saved)
        return 0
    for m in layers:
        m.running_mean.copy_(distributed.all_reduce_mean(m.running_mean * used) * world / total)
        m.running_var.copy_(distributed.all_reduce_mean(m.running_var * used) * world / total)
    return int(round(total))
