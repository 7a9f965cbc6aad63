"""One evaluation pass over a part: metrics gathered from every rank, and on request each
modality's pooled features (for the linear probes) and the fused logits per clip.

Used by the loop (validation every epoch, the test at the end) and by ``cli.py evaluate``.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import distributed
from trainer.corrupt import CorruptLog
from trainer.loader import make_loader
from trainer.metrics import summarize
from trainer.predictions import ID_BYTES, ids_to_tensor, tensor_to_ids
from trainer.probe import run_probes
from trainer.run_config import RunConfig


def to_device(batch: dict, device: torch.device) -> dict:
    inputs = {m: {k: v.to(device, non_blocking=True) for k, v in d.items()} for m, d in batch["inputs"].items()}
    return {**batch, "inputs": inputs, "label": batch["label"].to(device, non_blocking=True)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, n_classes: int, autocast,
             features: dict | None = None, predictions: dict | None = None) -> dict:
    """Metrics over a whole part, gathered from every rank. A ``features`` dict, when given,
    receives each modality's pooled encoder features and the labels (numpy), for the probes;
    a ``predictions`` dict receives ``clip_id``, ``label`` and the fused ``logits`` (numpy),
    for ``logits_<part>.npz`` (trainer/predictions.py)."""
    core = model.module if isinstance(model, DDP) else model
    core.eval()
    # A decomposable head (late_linear) also gives each modality's share of the fused logits:
    # how much the fused classifier itself relies on it, whether or not its head is trained.
    decomposable = getattr(core.fusion, "decomposable", False)
    labels, fused, uni, share = [], [], {m: [] for m in core.modalities}, {m: [] for m in core.modalities}
    feats: dict[str, list] = {m: [] for m in core.modalities}
    ids: list[torch.Tensor] = []
    for batch in loader:
        if predictions is not None:
            ids.append(ids_to_tensor(batch["clip_id"], device))
        batch = to_device(batch, device)
        with autocast():
            out = core(batch["inputs"])
            parts = core.fusion.per_modality_logits(out.features, split_bias=True) if decomposable else {}
        labels.append(batch["label"])
        fused.append(out.fused.float())
        for m in uni:
            uni[m].append(out.unimodal[m].float())
            if features is not None:
                feats[m].append(out.features[m].float())
            if decomposable:
                share[m].append(parts[m].float())
    core.train()
    empty = torch.zeros(0, n_classes, device=device)
    cat = lambda xs, e: distributed.gather_rows(torch.cat(xs) if xs else e).cpu().numpy()  # noqa: E731
    y = cat(labels, torch.zeros(0, dtype=torch.long, device=device))
    shares = {m: cat(v, empty) for m, v in share.items()} if decomposable else None
    if features is not None:
        features.update({m: cat(v, torch.zeros(0, core.dims[m], device=device)) for m, v in feats.items()}, label=y)
    fused_logits = cat(fused, empty)
    if predictions is not None:
        clip_ids = tensor_to_ids(cat(ids, torch.zeros(0, ID_BYTES, dtype=torch.uint8, device=device)))
        predictions.update(clip_id=clip_ids, label=y, logits=fused_logits)
    return summarize(y, fused_logits, {m: cat(v, empty) for m, v in uni.items()}, n_classes, share_logits=shares)


def probe_model(model: torch.nn.Module, shards: str, cfg: RunConfig, device: torch.device, autocast,
                part: str, part_features: dict, out: str | None, train_metrics: dict | None = None,
                corrupt_log: CorruptLog | None = None) -> dict:
    """Linear-probe accuracy per modality (trainer/probe.py): the frozen encoders' features of
    the train part (one more evaluation pass, read as ``cfg.data`` says) against ``part``'s,
    already collected. The model's own metrics on the train part in that pass (evaluation mode)
    go to ``train_metrics``; damaged samples it skips, to ``corrupt_log`` (the run's)."""
    def collect(name: str) -> dict:
        found: dict = {}
        loader, _ = make_loader(shards, name, cfg.data, train=False, device=device, corrupt_log=corrupt_log)
        metrics = evaluate(model, loader, device, cfg.model.n_classes, autocast, features=found)
        if train_metrics is not None and name == cfg.data.train_part:
            train_metrics.update(metrics)
        return found

    return run_probes(collect, cfg.data.train_part, part, part_features, out)
