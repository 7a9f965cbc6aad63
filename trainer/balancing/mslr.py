"""``mslr``: Modality-Specific Learning Rates (Yao & Mihalcea, "Modality-specific Learning Rates
for Effective Multimodal Additive Late-fusion", Findings of ACL 2022).

The paper trains an additive late-fusion model whose modalities each get their own learning
rate, and its adaptive strategy changes each modality's rate from that modality's recent
validation accuracy, independently of the others. Here:

- Groups: ``param_groups`` gives one optimizer group per modality (its encoder and unimodal
  head, ``modality_param_groups``) and a ``"shared"`` group (the fusion), all at the base lr.
  The per-modality rate is carried by ``group["lr_scale"]``, which the loop's schedule
  multiplies in at every step (setting ``group["lr"]`` would be overwritten); it starts at
  ``scales[m]`` (default 1 for every modality: the paper's "keep" strategy with tuned
  unimodal rates is ``scales={...}`` with ``decay=1``). The shared group is never rescaled.
- Rule, at each ``on_epoch_end`` and for each modality m with an entry in
  ``val_metrics["unimodal_accuracy"]``: let ``ref`` be the mean of m's last ``window``
  (default 1, i.e. the previous epoch) recorded accuracies. If the new accuracy is not above
  ``ref + tol`` (no improvement: that modality has stopped learning or overfits), its scale is
  multiplied by ``decay`` (default 0.5), floored at ``min_scale`` (default 0.01 of the base
  rate); otherwise it is multiplied by ``growth`` (default 1.0: keep), capped at its starting
  scale. The first epoch only records. The paper describes the adaptive rule only as
  "adjust each modality's rate from its recent validation accuracy"; this halving-on-plateau
  per modality is our concrete reading (a per-modality ReduceLROnPlateau with patience 1),
  with ``window`` to smooth noisy validation accuracies.
- Loss: CE(fused) + sum_m CE(unimodal_m), as ``multiloss``: the paper's late fusion keeps a
  classifier per modality, and the unimodal validation accuracies the rule reads are those
  heads' accuracies, which mean nothing if the heads are not trained.
- A new scale takes effect at the next schedule step. ``state_dict`` keeps the histories and
  scales; ``load_state_dict`` writes the scales back onto the optimizer's groups. The groups
  this method returned are updated as well as ``optimizer.param_groups``, because the loop's
  schedule closes over the group dicts it saw first, and ``optimizer.load_state_dict`` (on
  resume) replaces the dicts in ``optimizer.param_groups`` with new ones.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import register
from trainer.balancing.lr_scales import PerModalityLR


@register("mslr")
class MSLR(PerModalityLR):
    """Per-modality learning-rate scales, cut by ``decay`` when a modality's val accuracy stalls.

    ``log()`` gives ``lr_scale/<m>``.
    """

    requires = frozenset({"multimodal"})

    def __init__(
        self,
        decay: float = 0.5,
        min_scale: float = 0.01,
        growth: float = 1.0,
        window: int = 1,
        tol: float = 0.0,
        scales: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < decay <= 1:
            raise UserError(f"mslr: decay must be in (0, 1], got {decay}")
        if not min_scale > 0:
            raise UserError(f"mslr: min_scale must be > 0, got {min_scale}")
        if not growth >= 1:
            raise UserError(f"mslr: growth must be >= 1, got {growth}")
        if not int(window) >= 1:
            raise UserError(f"mslr: window must be >= 1, got {window}")
        scales = dict(scales or {})
        for m, v in scales.items():
            if not float(v) > 0:
                raise UserError(f"mslr: scales[{m!r}] must be > 0, got {v}")
        self.decay = float(decay)
        self.min_scale = float(min_scale)
        self.growth = float(growth)
        self.window = int(window)
        self.tol = float(tol)
        self.initial: dict[str, float] = {str(m): float(v) for m, v in scales.items()}
        self.scale: dict[str, float] = {}
        self.history: dict[str, list[float]] = {}

    def configure(self, model: nn.Module) -> None:
        unknown = set(self.initial) - set(model.modalities)
        if unknown:
            raise UserError(
                f"mslr: scales for unknown modalities {sorted(unknown)}; have {list(model.modalities)}"
            )
        for m in model.modalities:
            self.scale.setdefault(m, self.initial.get(m, 1.0))
            self.history.setdefault(m, [])

    def on_epoch_end(self, model: nn.Module, epoch: int, val_metrics: Mapping[str, Any]) -> None:
        accs = val_metrics.get("unimodal_accuracy") or {}
        for m, acc in accs.items():
            if m not in self.scale:
                continue
            acc = float(acc)
            past = self.history[m][-self.window:]
            if past:
                ref = sum(past) / len(past)
                if acc <= ref + self.tol:
                    self.scale[m] = max(self.min_scale, self.scale[m] * self.decay)
                else:
                    cap = max(self.initial.get(m, 1.0), self.scale[m])
                    self.scale[m] = min(cap, self.scale[m] * self.growth)
            self.history[m].append(acc)
        self._apply()

    def log(self) -> dict[str, float]:
        return {f"lr_scale/{m}": float(s) for m, s in self.scale.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": {m: float(s) for m, s in self.scale.items()},
            "history": {m: [float(a) for a in h] for m, h in self.history.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale.update({str(m): float(s) for m, s in dict(state.get("scale", {})).items()})
        history = dict(state.get("history", {}))
        self.history.update({str(m): [float(a) for a in h] for m, h in history.items()})
        self._apply()
