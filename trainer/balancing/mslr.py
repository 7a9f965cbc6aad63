"""``mslr``: Modality-Specific Learning Rates (Yao & Mihalcea, "Modality-specific Learning Rates
for Effective Multimodal Additive Late-fusion", Findings of ACL 2022).

Checked against the reimplementation in lihong2303/AGM_ICCV2023 ``run/CREMAD_main.py``
(``train``, the ``MSLR`` branch, and ``CREMAD_main``, the accuracy memory) with the
additive late-fusion model of ``model/CREMAD_net.py`` (``AVClassifier_Sum``).

- Groups: ``param_groups`` gives one optimizer group per modality (its encoder and unimodal
  head, ``modality_param_groups``) and a ``"shared"`` group (the fusion), all at the base lr.
  The per-modality rate is ``group["lr_scale"]``, which the loop's schedule multiplies in at
  every step: the reference multiplies the gradients instead, the same thing under its SGD
  but not under Adam, so a rate is what we scale.
- Scale of modality m = ``scales[m]`` * ratio_m, with the reference's starting scales
  (``scales``: by modality name, or a list by position in the model's modality order;
  default [0.9, 1.1], the reference's audio then visual, any further modality 1.0) and

      ratio_m = acc_m(this epoch) / mean(acc_m over the previous ``window`` epochs)

  once ``window`` (5) accuracies are recorded, 1 before (the first ``window`` epochs only
  record). It is recomputed from the starting scale at every ``on_epoch_end``, so it goes up
  and down with the modality's validation accuracy, and takes effect from the next epoch.
  A zero mean leaves ratio 1.
- Accuracy of modality m: with a decomposable fusion (``late_linear``: logits = sum of
  per-modality terms, as the reference's ``out_a + out_v``) it is the validation accuracy of
  m's additive share (``share_accuracy``), and the loss is CE of the fused logits only, as the
  reference's. Other fusions have no per-modality share: there the unimodal heads are trained
  (loss CE(fused) + sum_m CE(head_m), as ``multiloss``) and their accuracy is read.

Departures (also in docs/methods.md):

- The late-fusion layer's columns of modality m stay in the shared group at the base rate
  (an optimizer group holds whole tensors); the reference's per-modality classifiers get
  that modality's rate.
- The AGM repository applies MSLR only inside its ``--modulation_ends 20`` window (a flag it
  shares with AGM); the MSLR paper has no window, so the scales apply for the whole run.

``state_dict`` keeps the histories and scales; ``load_state_dict`` writes the scales back onto
the optimizer's groups (see ``lr_scales.py`` for why both the returned and the optimizer's
group dicts are updated).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import Balancer, register
from trainer.balancing.lr_scales import PerModalityLR

# lihong2303/AGM_ICCV2023 run/CREMAD_main.py: audio_lr_init_coeff 0.9, visual_lr_init_coeff 1.1, for
# its first and second modality: by position, so modalities named otherwise get them too.
REFERENCE_SCALES = (0.9, 1.1)


@register("mslr")
class MSLR(PerModalityLR):
    """Per-modality learning-rate scales that follow each modality's validation-accuracy trend.

    ``log()`` gives ``lr_scale/<m>``.
    """

    requires = frozenset({"multimodal"})

    def __init__(self, window: int = 5, scales: Mapping[str, float] | list[float] | None = None) -> None:
        super().__init__()
        if not int(window) >= 1:
            raise UserError(f"mslr: window must be >= 1, got {window}")
        # A list gives the scales by position in the model's modality order (resolved in configure).
        self.positional = list(scales) if isinstance(scales, (list, tuple)) else None
        given = {str(i): v for i, v in enumerate(self.positional)} if self.positional is not None else dict(scales or {})
        for m, v in given.items():
            if not float(v) > 0:
                raise UserError(f"mslr: scales[{m!r}] must be > 0, got {v}")
        self.window = int(window)
        self.given = {str(m): float(v) for m, v in given.items()}
        self.initial: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.history: dict[str, list[float]] = {}
        self.decomposable = False

    def configure(self, model: nn.Module) -> None:
        modalities = list(model.modalities)
        positional = self.positional if self.positional is not None else (None if self.given else list(REFERENCE_SCALES))
        if positional is not None:
            if len(positional) > len(modalities):
                raise UserError(f"mslr: {len(positional)} scales for {len(modalities)} modalities ({', '.join(modalities)})")
            start = {m: float(v) for m, v in zip(modalities, positional)}
        else:
            unknown = set(self.given) - set(modalities)
            if unknown:
                raise UserError(f"mslr: scales for unknown modalities {sorted(unknown)}; have {modalities}")
            start = self.given
        self.decomposable = bool(getattr(model.fusion, "decomposable", False))
        self.unused_parameters = self.decomposable  # CE(fused) alone leaves the unimodal heads without a gradient
        for m in model.modalities:
            self.initial[m] = float(start.get(m, 1.0))
            self.scale.setdefault(m, self.initial[m])
            self.history.setdefault(m, [])

    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.decomposable:  # CE of the summed late-fusion logits only, as the reference
            return Balancer.compute_loss(self, model, batch, out)
        return super().compute_loss(model, batch, out)

    def on_epoch_end(self, model: nn.Module, epoch: int, val_metrics: Mapping[str, Any]) -> None:
        key = "share_accuracy" if self.decomposable and val_metrics.get("share_accuracy") else "unimodal_accuracy"
        accs = val_metrics.get(key) or {}
        for m, acc in accs.items():
            if m not in self.scale:
                continue
            acc = float(acc)
            past = self.history[m][-self.window:]
            ratio = 1.0
            if len(past) == self.window and sum(past) > 0:
                ratio = acc / (sum(past) / len(past))
            self.scale[m] = self.initial[m] * ratio
            self.history[m] = (self.history[m] + [acc])[-self.window:]
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
