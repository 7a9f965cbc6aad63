"""``pmr``: Prototypical Modal Rebalance (Fan et al., "PMR: Prototypical Modal Rebalance for
Multimodal Learning", CVPR 2023).

Each epoch start (``on_epoch_start``), without gradients and in eval mode, the training loader
is walked (at most ``max_batches`` batches; None = all) and for every modality m and class c

    p_c^m = mean of out.features[m] over the samples of class c          (float32)

Each training step, for every modality m with features z^m (B, D_m):

    logits_proto^m = -||z^m - p_c^m||^2         (squared Euclidean, one column per class)
    PCE_m          = CE(logits_proto^m, y)
    conf_m         = batch mean of softmax(logits_proto^m)[y]              (detached)
    rho_m          = mean_{j != m} conf_j / conf_m     (> 1: m is the weaker modality)
    coef_m         = min(alpha * (rho_m - 1), max_coef) if rho_m > 1 else 0
    loss           = CE(fused) + sum_m coef_m * PCE_m

so only the weaker modality (the one whose features sit less confidently by their class
prototype) gets the prototypical term, weighted by how far behind it is; PCE gradients flow
into encoder m only (the prototypes are constants). For M = 2 this is the paper's
rho = conf_a / conf_v rule with coefficient beta * (rho - 1) on the slow modality.

Choices and departures:

- alpha = 2 by default (the paper tunes this strength per dataset); ``max_coef`` = 10 caps the
  coefficient so a near-zero confidence cannot explode the loss.
- The paper's entropy regularisation of the dominant modality's prototype distribution (its
  second term, to keep the fast modality from overfitting early) is omitted.
- A class without any sample in the walked batches keeps its previous prototype, or zeros
  before any exists; its logit is then -||z||^2.
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
from trainer.balancing.base import Balancer, register, to_floats
from trainer.distributed import all_reduce_mean


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def proto_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """-||z - p_c||^2 for each row of ``features`` (B, D) and prototype (C, D): (B, C), float32."""
    z = features.float()
    return -((z[:, None, :] - prototypes.to(z.device)[None, :, :]) ** 2).sum(dim=-1)


@register("pmr")
class PMR(Balancer):
    """Prototype-based rebalancing (see the module docstring).

    ``log()`` gives ``rho/<m>``, ``pce/<m>``, ``coef/<m>`` and ``conf/<m>`` of the last training step.
    """

    requires = frozenset({"multimodal"})

    def __init__(self, alpha: float = 2.0, max_coef: float = 10.0, max_batches: int | None = None) -> None:
        super().__init__()
        if not alpha >= 0:
            raise UserError(f"pmr: alpha must be >= 0, got {alpha}")
        if not max_coef >= 0:
            raise UserError(f"pmr: max_coef must be >= 0, got {max_coef}")
        if max_batches is not None and int(max_batches) < 1:
            raise UserError(f"pmr: max_batches must be >= 1 or None, got {max_batches}")
        self.alpha, self.max_coef = float(alpha), float(max_coef)
        self.max_batches = None if max_batches is None else int(max_batches)
        self.prototypes: dict[str, torch.Tensor] = {}     # m -> (C, D_m) float32, CPU
        self._device_protos: dict[str, torch.Tensor] = {}
        self._last: dict[str, dict[str, float]] = {}

    # -- prototypes ------------------------------------------------------------------------
    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Any = None, val_loader: Any = None) -> None:
        if loader is None:
            return
        device = next(model.parameters()).device
        sums: dict[str, torch.Tensor] = {}
        counts: torch.Tensor | None = None
        batches = loader if self.max_batches is None else itertools.islice(loader, self.max_batches)
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
                old = torch.zeros_like(new)
            self.prototypes[m] = torch.where(seen[:, None], new, old.to(device)).cpu()
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
    ) -> tuple[torch.Tensor, dict[str, float]]:
        label = batch["label"]
        loss = F.cross_entropy(out.fused, label)
        parts = {"ce_fused": loss}
        modalities = [m for m in out.features if m in self.prototypes]
        if len(modalities) < 2 or len(modalities) != len(out.features):
            return loss, to_floats(parts)

        pce, conf = {}, []
        for m in modalities:
            logits = proto_logits(out.features[m], self._protos(m, out.features[m].device))
            pce[m] = F.cross_entropy(logits, label)
            conf.append(logits.detach().softmax(dim=-1).gather(1, label.view(-1, 1)).mean())
        conf_t = all_reduce_mean(torch.stack(conf)).clamp_min(1e-8)
        n = conf_t.numel()
        rho = ((conf_t.sum() - conf_t) / (n - 1)) / conf_t
        coef = torch.where(rho > 1, (self.alpha * (rho - 1)).clamp(max=self.max_coef), torch.zeros_like(rho))

        for i, m in enumerate(modalities):
            parts[f"pce_{m}"] = pce[m]
            if coef[i] > 0:
                loss = loss + coef[i].to(pce[m].dtype) * pce[m]

        bare = getattr(model, "module", model)
        if bare.training:
            rows = {"rho": rho, "coef": coef, "conf": conf_t,
                    "pce": torch.stack([pce[m].detach() for m in modalities])}
            self._last = {key: dict(zip(modalities, v.tolist())) for key, v in rows.items()}
        return loss, to_floats(parts)

    # -- checkpoints and logging -----------------------------------------------------------
    def log(self) -> dict[str, float]:
        return {f"{key}/{m}": float(v) for key, row in self._last.items() for m, v in row.items()}

    def state_dict(self) -> dict[str, Any]:
        if not self.prototypes and not self._last:
            return {}
        return {"prototypes": {m: p.clone() for m, p in self.prototypes.items()},
                "last": {key: dict(row) for key, row in self._last.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prototypes = {m: torch.as_tensor(p, dtype=torch.float32).clone()
                           for m, p in (state.get("prototypes") or {}).items()}
        self._device_protos = {}
        self._last = {key: {m: float(v) for m, v in row.items()} for key, row in (state.get("last") or {}).items()}
