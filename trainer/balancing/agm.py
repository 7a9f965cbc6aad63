"""``agm``: Adaptive Gradient Modulation (Li et al., "Boosting Multi-modal Model Performance
with Adaptive Gradient Modulation", ICCV 2023).

Works for any fusion (no decomposable head needed) and M >= 2 modalities. On every training
step, for the modality set N (|N| = M):

    v(S)  = fused logits with every modality outside S dropped (features zeroed),
            for every S subset of N; v(N) = out.fused (the loop's forward), v({}) = all dropped
    phi_m = sum_{S subset of N \\ {m}} |S|! (M - |S| - 1)! / M! * [v(S u {m}) - v(S)]
            (Shapley value of modality m; efficiency: sum_m phi_m + v({}) = v(N))
    s_m   = batch mean of log softmax(phi_m)[y]                 (= -CE(phi_m, y); detached)
    r_m   = exp(s_m - mean_{j != m} s_j)                        (current relative strength)
    rbar_m= exp(sbar_m - mean_{j != m} sbar_j)                  (the same from running means)
    k_m   = clip(exp(alpha * (rbar_m - r_m)), 1 / k_max, k_max)
    sbar_m <- momentum * sbar_m + (1 - momentum) * s_m          (after k is computed)

and the gradient reaching encoder m through ``out.features[m]`` is multiplied by k_m (a
tensor hook registered in ``compute_loss``). Loss = CE(fused). A modality doing better than
its running relative strength (r_m > rbar_m) is damped (k_m < 1), one doing worse is boosted.

What comes from the paper (and its abstract): the adaptive modulation of each modality's
gradient for arbitrary fusion, using Shapley-value mono-modal responses obtained by zero
masking modalities in the fused model, an exponential coefficient with strength alpha and a
running (historical) average of the modality scores as the reference point. The M = 2 case
is phi_a = 1/2 [v(a,v) - v(v) + v(a) - v({})], needing 3 extra forwards.

Choices where the paper / abstract is silent or where we could not check the reference code:

- Score: the batch mean of the true-class log-probability of phi_m (-CE), in float32. The
  generalisation to M > 2 compares s_m with the mean of the other modalities' scores.
- Running means: exponential moving average with ``momentum`` (0.9), initialised with the
  first training batch's scores (so k = 1 on the first step); k uses the running means from
  *before* the current batch. Kept in ``state_dict``.
- k is clipped to [1/k_max, k_max] (k_max = 5) so a single odd batch cannot blow up or stop
  an encoder; alpha = 1.5 by default.
- The 2^M - 1 extra forwards run under ``torch.no_grad`` and in eval mode (the model's
  train/eval mode is restored afterwards), so dropout does not add noise to the scores and
  batch-norm statistics are not updated with zero-masked inputs. They cost compute only.
- k scales everything upstream of ``features[m]`` (encoder m); the unimodal heads are not in
  the loss and the fusion's gradient is left alone.
- Under DDP the scores are averaged over ranks before k, so every rank applies the same k.
- Not in training mode (e.g. a validation loss): plain CE(fused), no extra forwards, no
  state change, no hooks.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import Balancer, register, to_floats
from trainer.distributed import all_reduce_mean


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, then restore every submodule's own train/eval flag."""
    flags = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


def coalition_values(model: nn.Module, inputs: Mapping[str, Any], modalities: Sequence[str],
                     full: torch.Tensor) -> dict[frozenset, torch.Tensor]:
    """v(S) for every S subset of ``modalities``: fused logits with the others dropped (float32).

    v(all) is ``full`` (not recomputed); the other 2^M - 1 subsets cost one forward each.
    """
    values: dict[frozenset, torch.Tensor] = {frozenset(modalities): full.detach().float()}
    for size in range(len(modalities)):
        for keep in itertools.combinations(modalities, size):
            drop = frozenset(m for m in modalities if m not in keep)
            values[frozenset(keep)] = model(inputs, drop=drop).fused.detach().float()
    return values


def shapley_logits(values: Mapping[frozenset, torch.Tensor], modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """phi_m = sum_{S subset of others} |S|!(M-|S|-1)!/M! [v(S u {m}) - v(S)]."""
    n = len(modalities)
    phi = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        total = torch.zeros_like(values[frozenset(modalities)])
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for s in itertools.combinations(others, size):
                s = frozenset(s)
                total = total + weight * (values[s | {m}] - values[s])
        phi[m] = total
    return phi


def relative_strength(scores: torch.Tensor) -> torch.Tensor:
    """r_m = exp(s_m - mean_{j != m} s_j)."""
    m = scores.numel()
    others = (scores.sum() - scores) / (m - 1)
    return torch.exp(scores - others)


def agm_coefficients(scores: torch.Tensor, running: torch.Tensor, alpha: float, k_max: float) -> torch.Tensor:
    """k_m = clip(exp(alpha (rbar_m - r_m)), 1/k_max, k_max)."""
    diff = relative_strength(running) - relative_strength(scores)
    # clamp the exponent first so exp never overflows
    bound = math.log(k_max) / alpha
    return torch.exp(alpha * diff.clamp(-bound, bound)).clamp(1.0 / k_max, k_max)


@register("agm")
class AGM(Balancer):
    """Shapley-scored adaptive gradient modulation (see the module docstring).

    ``log()`` gives ``k/<m>``, ``score/<m>`` (last training batch) and ``mean/<m>`` (running mean).
    """

    requires = frozenset({"multimodal"})

    def __init__(self, alpha: float = 1.5, momentum: float = 0.9, k_max: float = 5.0) -> None:
        super().__init__()
        if not alpha > 0:
            raise UserError(f"agm: alpha must be > 0, got {alpha}")
        if not 0 <= momentum < 1:
            raise UserError(f"agm: momentum must be in [0, 1), got {momentum}")
        if not k_max > 1:
            raise UserError(f"agm: k_max must be > 1, got {k_max}")
        self.alpha, self.momentum, self.k_max = float(alpha), float(momentum), float(k_max)
        self.modalities: list[str] = []
        self.running: torch.Tensor | None = None   # (M,) float32, CPU
        self.steps = 0
        self._last: dict[str, list[float]] = {}

    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, float]]:
        label = batch["label"]
        loss = F.cross_entropy(out.fused, label)
        parts = {"ce_fused": loss}
        bare = getattr(model, "module", model)
        if not bare.training:
            return loss, to_floats(parts)

        modalities = list(bare.modalities)
        with torch.no_grad(), eval_mode(bare):
            values = coalition_values(model, batch["inputs"], modalities, out.fused)
            phi = shapley_logits(values, modalities)
            scores = torch.stack([
                F.log_softmax(phi[m], dim=-1).gather(1, label.view(-1, 1)).mean() for m in modalities
            ])
            scores = all_reduce_mean(scores).cpu()

        if self.running is None or self.modalities != modalities:
            self.modalities, self.running = modalities, scores.clone()
        k = agm_coefficients(scores, self.running, self.alpha, self.k_max)
        self.running = self.momentum * self.running + (1 - self.momentum) * scores
        self.steps += 1

        for i, m in enumerate(modalities):
            feat = out.features[m]
            if feat.requires_grad:
                feat.register_hook(lambda g, k_m=float(k[i]): g * k_m)
        self._last = {"k": k.tolist(), "score": scores.tolist()}
        return loss, to_floats(parts)

    def log(self) -> dict[str, float]:
        if not self._last:
            return {}
        out = {}
        for key, values in self._last.items():
            out.update({f"{key}/{m}": float(v) for m, v in zip(self.modalities, values)})
        if self.running is not None:
            out.update({f"mean/{m}": float(v) for m, v in zip(self.modalities, self.running.tolist())})
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.running is None:
            return {}
        return {"modalities": list(self.modalities), "running": self.running.clone(), "steps": self.steps,
                "last": {key: list(v) for key, v in self._last.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            self.running, self.modalities, self.steps, self._last = None, [], 0, {}
            return
        self.modalities = list(state["modalities"])
        self.running = torch.as_tensor(state["running"], dtype=torch.float32).clone()
        self.steps = int(state.get("steps", 0))
        self._last = {key: list(v) for key, v in state.get("last", {}).items()}
