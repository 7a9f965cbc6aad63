"""``pmr``: Prototypical Modal Rebalance (Fan et al., "PMR: Prototypical Modal Rebalance for
Multimodal Learning", CVPR 2023). Checked against the authors' code,
fanyunfeng-bit/Modal-Imbalance-PMR ``main_Prototype_grad.py`` (``calculate_prototype``,
``train_epoch``, ``EU_dist``), and GeWu-Lab/BalanceBenchmark ``PMR_trainer.py``.

Prototypes. At each epoch start (``on_epoch_start``), without gradients and in eval mode, the
first ``max_batches`` training batches are walked (default: a tenth of the epoch's batches,
at least one, as the reference's ``len(loader) // 10``) and for every modality m and class c

    new_c^m = mean of out.features[m] over the walked samples of class c        (float32)
    p_c^m   = (1 - momentum) * new_c^m + momentum * p_c^m(previous)   (momentum 0.2; the
                                                  first prototypes are taken as they are)

Each training step inside the window (``modulation_starts <= epoch <= modulation_ends``; by
default the reference's epochs 0-100 of 150 scaled to the run's ``train.epochs``), for every
modality m with features z^m (B, D_m):

    logits_proto^m = -||z^m - p_c^m||_2      (plain Euclidean distance, one column per class)
    PCE_m          = CE(logits_proto^m, y)
    conf_m         = batch mean of softmax(logits_proto^m)[y]              (detached)
    rho_m          = mean_{j != m} conf_j / conf_m     (> 1: m is the weaker modality)
    coef_m         = alpha if rho_m > 1 else 0                       (alpha = 1, the reference)
    loss           = CE(fused) + sum_m coef_m * PCE_m

so the weaker modality (the one whose features sit less confidently by their class
prototype) gets the prototypical term with a fixed weight; PCE gradients flow into encoder m
only (the prototypes are constants). For M = 2 this is the reference's ``ratio_a_p`` rule.
Outside the window the loss is CE(fused) only, and after it no prototypes are computed.

Choices and departures (docs/methods.md lists them too):

- The paper's entropy regularisation of the dominant modality's prototype distribution is
  omitted, as in the authors' code.
- A class without any sample in the walked batches keeps its previous prototype, or zeros
  before any exists (the reference divides by a zero count and gets NaN).
- The reference computes the prototypes it uses in epoch 1 with its epoch argument still 0,
  so it blends them only from epoch 2 on; here every prototype after the first is blended.
- M > 2: rho_m compares m with the mean confidence of the other modalities; every modality with
  rho_m > 1 gets its term.
- Before the first ``on_epoch_start`` (no prototypes yet) the loss is CE(fused) only.
- Under DDP the per-class sums and counts, and the confidences, are averaged over ranks, so
  every rank holds the same prototypes and takes the same decision.
- Prototypes are kept in ``state_dict`` (CPU float32 tensors, one (C, D_m) per modality).
- Not in training mode: the same loss, but the logged values are not updated.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.agm import eval_mode
from trainer.balancing.base import Balancer, log_parts, register
from trainer.balancing.window import EpochWindow, PaperWindow
from trainer.distributed import all_reduce_mean


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def proto_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """-||z - p_c||_2 for each row of ``features`` (B, D) and prototype (C, D): (B, C), float32."""
    z = features.float()
    # the exact difference form: the matrix-product shortcut loses precision near p_c
    return -torch.cdist(z, prototypes.to(z.device).float(), compute_mode="donot_use_mm_for_euclid_dist")


def tenth_of(loader: Any) -> int | None:
    """max(1, batches per epoch // 10), as the reference; None when the loader has no length."""
    try:
        n = len(loader)
    except TypeError:
        n = int(getattr(loader, "nsamples", -1))  # a webdataset loader cut with ``with_epoch``
    return max(1, n // 10) if n > 0 else None


@register("pmr")
class PMR(EpochWindow, Balancer):
    """Prototype-based rebalancing (see the module docstring).

    ``log()`` gives ``rho/<m>``, ``pce/<m>``, ``coef/<m>`` and ``conf/<m>`` of the last training step.
    """

    requires = frozenset({"multimodal"})
    # main_Prototype_grad.py: --modulation_starts 0 --modulation_ends 100 --epochs 150
    PAPER_WINDOW = PaperWindow(first=0, last=100, epochs=150)

    def __init__(self, alpha: float = 1.0, momentum: float = 0.2, max_batches: int | None = None,
                 modulation_starts: int = 0, modulation_ends: int | None = None) -> None:
        super().__init__()
        if not alpha >= 0:
            raise UserError(f"pmr: alpha must be >= 0, got {alpha}")
        if not 0 <= momentum < 1:
            raise UserError(f"pmr: momentum must be in [0, 1), got {momentum}")
        if max_batches is not None and int(max_batches) < 1:
            raise UserError(f"pmr: max_batches must be >= 1 or None (a tenth of the epoch), got {max_batches}")
        self.alpha, self.momentum = float(alpha), float(momentum)
        self.max_batches = None if max_batches is None else int(max_batches)
        self.init_window("pmr", modulation_starts, modulation_ends)
        self.epoch = 0
        self.prototypes: dict[str, torch.Tensor] = {}     # m -> (C, D_m) float32, CPU
        self._device_protos: dict[str, torch.Tensor] = {}
        # the last training step's rho, coef, conf, pce: device tensors (M,) until ``log()``
        self._last: dict[str, dict[str, float] | torch.Tensor] = {}
        self._last_modalities: list[str] = []

    # -- prototypes ------------------------------------------------------------------------
    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Any = None, val_loader: Any = None) -> None:
        self.epoch = int(epoch)
        if loader is None or epoch > self.modulation_ends:
            return
        device = next(model.parameters()).device
        sums: dict[str, torch.Tensor] = {}
        counts: torch.Tensor | None = None
        limit = self.max_batches if self.max_batches is not None else tenth_of(loader)
        batches = loader if limit is None else itertools.islice(loader, limit)
        with torch.no_grad(), eval_mode(model):
            for batch in batches:
                label = batch["label"].to(device)
                out = model(_to_device(batch["inputs"], device))
                n_classes = out.fused.shape[-1]
                if counts is None:
                    counts = torch.zeros(n_classes, dtype=torch.float32, device=device)
                counts += torch.bincount(label, minlength=n_classes).float()
                for m, feat in out.features.items():
                    if m not in sums:
                        sums[m] = torch.zeros(n_classes, feat.shape[-1], dtype=torch.float32, device=device)
                    sums[m].index_add_(0, label, feat.float())
        if counts is None:
            return
        counts = all_reduce_mean(counts)
        seen = counts > 0
        for m, total in sums.items():
            total = all_reduce_mean(total)
            new = total / counts.clamp_min(1)[:, None]
            old = self.prototypes.get(m)
            if old is None or old.shape != new.shape:
                self.prototypes[m] = torch.where(seen[:, None], new, torch.zeros_like(new)).cpu()
                continue
            old = old.to(device)
            blended = (1 - self.momentum) * new + self.momentum * old
            self.prototypes[m] = torch.where(seen[:, None], blended, old).cpu()
        self._device_protos = {}

    def _protos(self, m: str, device: torch.device) -> torch.Tensor:
        cached = self._device_protos.get(m)
        if cached is None or cached.device != device:
            cached = self.prototypes[m].to(device)
            self._device_protos[m] = cached
        return cached

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        label = batch["label"]
        loss = F.cross_entropy(out.fused, label)
        parts = {"ce_fused": loss}
        modalities = [m for m in out.features if m in self.prototypes]
        if len(modalities) < 2 or len(modalities) != len(out.features) or not self.in_window(self.epoch):
            return loss, log_parts(parts)

        pce, conf = {}, []
        for m in modalities:
            logits = proto_logits(out.features[m], self._protos(m, out.features[m].device))
            pce[m] = F.cross_entropy(logits, label)
            conf.append(logits.detach().softmax(dim=-1).gather(1, label.view(-1, 1)).mean())
        conf_t = all_reduce_mean(torch.stack(conf)).clamp_min(1e-8)
        n = conf_t.numel()
        rho = ((conf_t.sum() - conf_t) / (n - 1)) / conf_t
        coef = torch.where(rho > 1, torch.full_like(rho, self.alpha), torch.zeros_like(rho))

        active = (coef > 0).tolist()  # which prototype terms enter the loss: the step's one device sync
        for i, m in enumerate(modalities):
            parts[f"pce_{m}"] = pce[m]
            if active[i]:
                loss = loss + coef[i].to(pce[m].dtype) * pce[m]

        if model.training:
            self._last = {"rho": rho, "coef": coef, "conf": conf_t,
                          "pce": torch.stack([pce[m].detach() for m in modalities])}
            self._last_modalities = list(modalities)
        return loss, log_parts(parts)

    # -- checkpoints and logging -----------------------------------------------------------
    def _rows(self) -> dict[str, dict[str, float]]:
        """``_last`` as floats per modality, read from the device in one sync."""
        tensors = {k: v for k, v in self._last.items() if isinstance(v, torch.Tensor)}
        if tensors:
            values = torch.stack([v.float() for v in tensors.values()]).tolist()
            self._last.update({k: dict(zip(self._last_modalities, row)) for k, row in zip(tensors, values)})
        return self._last

    def log(self) -> dict[str, float]:
        return {f"{key}/{m}": float(v) for key, row in self._rows().items() for m, v in row.items()}

    def state_dict(self) -> dict[str, Any]:
        if not self.prototypes and not self._last:
            return {}
        return {"prototypes": {m: p.clone() for m, p in self.prototypes.items()}, "epoch": self.epoch,
                "last": {key: dict(row) for key, row in self._rows().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prototypes = {m: torch.as_tensor(p, dtype=torch.float32).clone()
                           for m, p in (state.get("prototypes") or {}).items()}
        self._device_protos = {}
        self.epoch = int(state.get("epoch", 0))
        self._last = {key: {m: float(v) for m, v in row.items()} for key, row in (state.get("last") or {}).items()}
