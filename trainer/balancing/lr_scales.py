"""Shared by the per-modality learning-rate methods (MSLR, MILES): one optimizer group per
modality plus ``shared``, each carrying an ``lr_scale`` that the loop's schedule multiplies
into every step's rate. Subclasses keep ``self.scale`` (modality -> scale) and call
``_apply()`` after changing it."""

from __future__ import annotations

from typing import Any

from torch import nn

from trainer.balancing.base import modality_param_groups
from trainer.balancing.multiloss import MultiLoss


class PerModalityLR(MultiLoss):
    """Multiloss objective plus per-modality ``lr_scale`` on the optimizer groups."""

    def __init__(self) -> None:
        super().__init__()
        self.scale: dict[str, float] = {}
        self._groups: list[dict[str, Any]] = []

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        groups = modality_param_groups(model, base_lr)
        for g in groups:
            if g["name"] in self.scale:
                g["lr_scale"] = self.scale[g["name"]]
        self._groups = groups
        return groups

    def attach_optimizer(self, optimizer: Any) -> None:
        super().attach_optimizer(optimizer)
        self._apply()

    def _apply(self) -> None:
        """Write the scales onto every group dict the optimizer or its schedule may hold."""
        groups = list(self._groups)
        if self.optimizer is not None:
            groups += [g for g in self.optimizer.param_groups if all(g is not h for h in groups)]
        for g in groups:
            name = g.get("name")
            if name in self.scale:
                g["lr_scale"] = self.scale[name]
