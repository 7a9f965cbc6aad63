"""``miles``: Modality-Informed Learning ratE Scheduler (Guerra-Manzanares & Shamout, "MILES:
Modality-Informed Learning Rate Scheduler for Balancing Multimodal Learning", IJCNN 2025,
arXiv 2510.17394).

The paper (only its abstract and summaries were available to us) balances a joint-fusion model
by giving each modality its own learning rate and changing it every epoch from the difference
between the modalities' *conditional utilization rates*: when one modality is used much more
than the other, the dominant modality's learning rate is lowered so the others can catch up.
Everything below that is more concrete than that sentence is our choice:

- Utilization. With the evaluation metrics the loop gives ``on_epoch_end`` (fused accuracy
  ``A`` = ``val_metrics["accuracy"]`` and unimodal head accuracies ``a_m`` =
  ``val_metrics["unimodal_accuracy"][m]``), the conditional utilization rate of modality m
  given the others is read as ``u_m = (A - mean_{j != m} a_j) / A``: how much of the fused
  accuracy is lost without m (Wu et al., 2022, with the unimodal heads standing in for the
  models without m). The imbalance is the spread of the u_m, ``d = max_m u_m - min_m u_m``
  (the reference implementation's delta; ``|u_a - u_v|`` for two modalities), which works
  out as ``d = (max_m a_m - min_m a_m) / ((M - 1) A)``: the relative accuracy gap for two
  modalities. If ``A`` is missing or not > 0, ``A`` is replaced by ``max_m a_m`` (and ``d``
  is 0 when every ``a_m`` is 0).
- Rule, at each ``on_epoch_end`` with unimodal accuracies for every modality: the dominant
  modality is the one with the highest ``a_m`` (first in modality order on ties). If
  ``d > tau`` (default 0.2: a 20 % relative gap), the dominant modality's ``lr_scale`` is
  set to ``mu`` (default 0.5) and every other modality's back to 1; otherwise every
  modality's scale goes back to 1. The reduction is applied for the next epoch only and is
  re-decided every epoch (the scheduler is driven by the latest observation, not a running
  product). With ``compound=True`` the decision is cumulative instead: if ``d > tau`` the
  dominant scale is multiplied by ``mu`` (floored at ``min_scale``, default 0.01) and the
  others are restored to 1; if ``d <= tau`` every scale is divided by ``mu`` and capped at 1
  (restored toward 1 by one step).
- Epochs without ``unimodal_accuracy`` (or missing one modality) change nothing. An epoch in
  which every u_m < 0 (the fused model is worse than every model without one modality, so no
  modality is over-used) counts as balanced, like ``d <= tau``: every scale goes back to 1
  (with ``compound``, one step back toward 1). This follows the third-party implementation
  docs/methods.md names (``miles_adjust_learning_rates``), which resets every learning rate
  to the base rate then.
- tau defaults to 0.2, that implementation's value.
- Groups and ``lr_scale``: as ``mslr`` (one optimizer group per modality from
  ``modality_param_groups`` plus a never-rescaled ``"shared"`` group for the fusion); the
  scale lives in ``group["lr_scale"]``, which the loop's schedule multiplies in at every step,
  so warm-up / cosine decay keep applying on top. The group dicts this method returned are
  updated as well as ``optimizer.param_groups`` (the schedule may hold either).
- Loss: CE(fused) + sum_m CE(unimodal_m) (``multiloss``). MILES needs per-modality
  performance every epoch; in this codebase that is the unimodal heads' accuracy, which is
  meaningless unless the heads are trained, so they get their own CE terms (their gradients
  also reach the encoders, as in ``mslr``).
- ``log()`` gives ``lr_scale/<m>`` and ``imbalance`` (the last ``d``, 0 before any
  epoch); ``state_dict`` keeps the scales, the last imbalance and the dominant modality.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import register
from trainer.balancing.lr_scales import PerModalityLR


def utilization(unimodal_accuracy: Mapping[str, float], fused_accuracy: float | None = None) -> dict[str, float]:
    """u_m = (A - mean_{j != m} a_j) / A, with A as in ``miles_imbalance``; 0 when A is 0."""
    accs = {m: float(a) for m, a in unimodal_accuracy.items()}
    ref = float(fused_accuracy) if fused_accuracy is not None else 0.0
    if not ref > 0:
        ref = max(accs.values())
    if not ref > 0:
        return {m: 0.0 for m in accs}
    others = {m: [a for k, a in accs.items() if k != m] for m in accs}
    return {m: (ref - sum(o) / len(o)) / ref for m, o in others.items()}


def miles_imbalance(unimodal_accuracy: Mapping[str, float], fused_accuracy: float | None = None) -> float:
    """d = max_m u_m - min_m u_m = (max_m a_m - min_m a_m) / ((M - 1) A), with A = max_m a_m
    when the fused accuracy is missing or <= 0."""
    accs = [float(a) for a in unimodal_accuracy.values()]
    if len(accs) < 2:
        raise ValueError(f"miles needs unimodal accuracies for at least 2 modalities, got {len(accs)}")
    ref = float(fused_accuracy) if fused_accuracy is not None else 0.0
    if not ref > 0:
        ref = max(accs)
    if not ref > 0:
        return 0.0
    return (max(accs) - min(accs)) / ((len(accs) - 1) * ref)


@register("miles")
class MILES(PerModalityLR):
    """Per-modality lr scales: the dominant modality's is cut to ``mu`` when the imbalance exceeds ``tau``.

    ``log()`` gives ``lr_scale/<m>`` and ``imbalance``.
    """

    requires = frozenset({"multimodal"})

    def __init__(self, tau: float = 0.2, mu: float = 0.5, compound: bool = False, min_scale: float = 0.01) -> None:
        super().__init__()
        if not tau >= 0:
            raise UserError(f"miles: tau must be >= 0, got {tau}")
        if not 0 < mu <= 1:
            raise UserError(f"miles: mu must be in (0, 1], got {mu}")
        if not 0 < min_scale <= 1:
            raise UserError(f"miles: min_scale must be in (0, 1], got {min_scale}")
        self.tau = float(tau)
        self.mu = float(mu)
        self.compound = bool(compound)
        self.min_scale = float(min_scale)
        self.scale: dict[str, float] = {}
        self.imbalance = 0.0
        self.dominant = ""

    def configure(self, model: nn.Module) -> None:
        for m in model.modalities:
            self.scale.setdefault(m, 1.0)

    def on_epoch_end(self, model: nn.Module, epoch: int, val_metrics: Mapping[str, Any]) -> None:
        accs = dict(val_metrics.get("unimodal_accuracy") or {})
        if any(m not in accs for m in self.scale):
            return
        accs = {m: float(accs[m]) for m in self.scale}  # modality order
        fused = val_metrics.get("accuracy")
        fused = None if fused is None else float(fused)
        self.imbalance = float(miles_imbalance(accs, fused))
        over_used = not all(u < 0 for u in utilization(accs, fused).values())  # all negative: none is
        best = max(accs.values())
        dominant = next(m for m, a in accs.items() if a == best)
        if over_used and self.imbalance > self.tau:
            self.dominant = dominant
            for m in self.scale:
                if m != dominant:
                    self.scale[m] = 1.0
                elif self.compound:
                    self.scale[m] = max(self.min_scale, self.scale[m] * self.mu)
                else:
                    self.scale[m] = self.mu
        else:
            self.dominant = ""
            for m in self.scale:
                self.scale[m] = min(1.0, self.scale[m] / self.mu) if self.compound else 1.0
        self._apply()

    def log(self) -> dict[str, float]:
        out = {f"lr_scale/{m}": float(s) for m, s in self.scale.items()}
        out["imbalance"] = float(self.imbalance)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": {m: float(s) for m, s in self.scale.items()},
            "imbalance": float(self.imbalance),
            "dominant": str(self.dominant),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale.update({str(m): float(s) for m, s in dict(state.get("scale", {})).items()})
        self.imbalance = float(state.get("imbalance", 0.0))
        self.dominant = str(state.get("dominant", ""))
        self._apply()
