"""``msam``: Modality-Aware SAM (Nowdeh, Ji, Ma & Afghah, "Modality-Aware SAM:
Sharpness-Aware-Minimization Driven Gradient Modulation for Harmonized Multimodal Learning",
arXiv:2510.24919, 2025).

Every training step, in three parts (the abstract's "identify, decompose, update"):

1. Identify the dominant modality from Shapley values of the batch *accuracy*:

       acc(S) = batch accuracy of the fused logits with every modality outside S dropped
       v_m    = sum_{S subset of N \\ {m}} |S|!(M-|S|-1)!/M! [acc(S u {m}) - acc(S)]
       d      = argmax_m v_m

2. Decompose the loss l = CE(fused) by those contributions:

       L_d = w_d * l          (the dominant modality's share)
       L_s = (sum_{m != d} w_m) * l

3. Update with sharpness-aware gradients for the dominant share only:

       eps   = rho * grad L_d(theta) / ||grad L_d(theta)||   (= rho * g / ||g||, g = grad l)
       grad  = grad L_d(theta + eps) + grad L_s(theta)
             = w_d * grad l(theta + eps) + (1 - w_d) * grad l(theta)

   so the dominant modality's part of the update seeks a flat minimum (robustness), while
   the rest is plain first-order learning that leaves room for the other modalities.

What comes from the paper: the per-iteration Shapley identification of the dominant
modality from accuracy contributions, the loss split into a dominant part L_d = v_d l and a
remainder L_s = sum_{m != d} v_m l, and the update theta - eta [grad L_d(theta + eps) +
grad L_s(theta)] with the SAM perturbation eps taken from L_d. The paper's code was not
released when this was written, so these are choices:

- Weights: ``normalize: true`` (default) uses w_m = max(v_m, 0) / sum_j max(v_j, 0), and
  w = 1/M each when no modality helps the batch accuracy (e.g. at initialisation, where the
  raw v_m are all ~0 and the raw rule would make every gradient vanish). The split then
  keeps the gradient's overall scale. ``normalize: false`` uses the raw v_m as written.
- rho = 0.05, SAM's default (Foret et al. 2021); the paper's CREMA-D value is not known to us.
- The coalition forwards run without gradients in eval mode, the full coalition included
  (its accuracy is not taken from the loop's train-mode forward, so dropout and batch-norm
  act alike in every acc(S)): 2^M extra forwards, then one extra forward and backward at
  theta + eps: about twice joint's step.
- The perturbed pass runs in train mode with batch-norm running statistics frozen (momentum
  0), so the statistics are updated once per step, and in the same autocast as the loop's.
- Under DDP, the perturbed pass runs on the bare model with ``torch.autograd.grad`` (DDP's
  hooks stay out of it) and its gradients are averaged over ranks by hand; accuracies are averaged before the Shapley values, so every rank agrees.
- Not in training mode: plain CE(fused), nothing else.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import is_initialized as dist_ready

from avbalance.errors import UserError
from trainer.balancing.agm import coalition_values, eval_mode, shapley_logits
from trainer.balancing.base import Balancer, log_parts, read_floats, register
from trainer.distributed import all_reduce_mean


def shapley_accuracy(values: Mapping[frozenset, torch.Tensor], label: torch.Tensor,
                     modalities: list[str]) -> torch.Tensor:
    """v_m: Shapley values (M,) of the batch accuracy, from every coalition's fused logits."""
    acc = {s: (logits.argmax(-1) == label).float().mean() for s, logits in values.items()}
    acc = dict(zip(acc, all_reduce_mean(torch.stack(list(acc.values()))).unbind()))
    phi = shapley_logits(acc, modalities)
    return torch.stack([phi[m] for m in modalities])


def split_weights(shapley: torch.Tensor, normalize: bool) -> torch.Tensor:
    """w_m: the positive part of v normalised to sum 1 (uniform if none is positive), or v itself."""
    if not normalize:
        return shapley.clone()
    positive = shapley.clamp_min(0)
    total = positive.sum()
    return positive / total if total > 0 else torch.full_like(shapley, 1.0 / shapley.numel())


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Batch-norm layers keep normalising with batch statistics but do not update running ones."""
    saved = [(mod, mod.momentum) for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    for mod, _ in saved:
        mod.momentum = 0.0
    try:
        yield
    finally:
        for mod, momentum in saved:
            mod.momentum = momentum


@register("msam")
class MSAM(Balancer):
    """Shapley-dominant sharpness-aware modulation (see the module docstring).

    ``log()`` gives ``shapley/<m>``, ``weight/<m>``, ``dominant/<m>`` (1 for the dominant
    modality) and ``sharpness`` (l(theta + eps) - l(theta)) of the last training step.
    """

    requires = frozenset({"multimodal"})

    def __init__(self, rho: float = 0.05, normalize: bool = True) -> None:
        super().__init__()
        if not rho >= 0:
            raise UserError(f"msam: rho must be >= 0, got {rho}")
        self.rho, self.normalize = float(rho), bool(normalize)
        self.modalities: list[str] = []
        self._pending: tuple[float, float] | None = None   # (w_d, w_s) for after_backward
        self._autocast: tuple[str, torch.dtype] | None = None
        self._loss: torch.Tensor | float = 0.0
        self._last: dict[str, float] = {}
        self._perturbed: torch.Tensor | None = None  # l(theta + eps) of the last step, read by ``log()``

    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        label = batch["label"]
        loss = F.cross_entropy(out.fused, label)
        parts = {"ce_fused": loss}
        self._pending = None
        if not model.training:
            return loss, log_parts(parts)

        self.modalities = list(model.modalities)
        with torch.no_grad(), eval_mode(model):
            values = coalition_values(model, batch["inputs"], self.modalities, None)
            # the step's first device sync: the dominant modality and the weights are Python scalars
            shapley = shapley_accuracy(values, label, self.modalities).cpu()
        weights = split_weights(shapley, self.normalize)
        d = int(torch.argmax(shapley))
        w_d = float(weights[d])
        w_s = float(weights.sum() - weights[d])
        self._pending = (w_d, w_s)
        device_type = label.device.type
        self._autocast = ((device_type, torch.get_autocast_dtype(device_type))
                          if torch.is_autocast_enabled(device_type) else None)
        self._loss, self._perturbed = loss.detach(), None  # read at logging steps only
        self._last = {**{f"shapley/{m}": float(v) for m, v in zip(self.modalities, shapley)},
                      **{f"weight/{m}": float(w) for m, w in zip(self.modalities, weights)},
                      **{f"dominant/{m}": float(i == d) for i, m in enumerate(self.modalities)}}
        return loss, log_parts(parts)

    def after_backward(self, model: nn.Module, out: Any, batch: Mapping[str, Any]) -> None:
        if self._pending is None:
            return
        w_d, w_s = self._pending
        self._pending = None
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        with torch.no_grad():
            g0 = [p.grad.detach().clone() for p in params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g0]))
            # the step's second device sync: the norm, read once (a Python scalar for ``add_``)
            norm_value = float(norm) if self.rho != 0 else 0.0
            if self.rho == 0 or not math.isfinite(norm_value) or norm_value == 0:
                for p, g in zip(params, g0):
                    p.grad = (w_d + w_s) * g
                return
            saved = [p.detach().clone() for p in params]   # restored exactly (x + e - e != x in floats)
            for p, g in zip(params, g0):
                # eps follows grad L_d = w_d * g: its sign flips only for a negative raw w_d
                p.add_(g, alpha=(self.rho if w_d >= 0 else -self.rho) / norm_value)

        # The dominant share's gradient at the perturbed weights. autograd.grad leaves .grad
        # alone and does not fire DDP's reduction hooks; ranks are averaged by hand below.
        autocast = (torch.autocast(self._autocast[0], dtype=self._autocast[1]) if self._autocast
                    else contextlib.nullcontext())
        with torch.enable_grad(), frozen_batchnorm_stats(model), autocast:
            perturbed = F.cross_entropy(model(batch["inputs"]).fused, batch["label"])
        g1s = torch.autograd.grad(perturbed, params, allow_unused=True)

        with torch.no_grad():
            for p, original, g, g1 in zip(params, saved, g0, g1s):
                p.copy_(original)
                g1 = torch.zeros_like(g) if g1 is None else g1
                if dist_ready() and torch.distributed.get_world_size() > 1:
                    g1 = all_reduce_mean(g1)
                p.grad = w_d * g1 + w_s * g
        self._perturbed = perturbed.detach()

    def log(self) -> dict[str, float]:
        if self._perturbed is not None:  # sharpness = l(theta + eps) - l(theta), in float64 as before
            read = read_floats({"perturbed": self._perturbed, "loss": self._loss})
            self._last["sharpness"] = read["perturbed"] - read["loss"]
            self._perturbed = None
        return dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        """Only the last step's coefficients (for logging continuity): M-SAM decides per batch."""
        return {"last": self.log()} if self._last else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._last = {k: float(v) for k, v in state.get("last", {}).items()}
