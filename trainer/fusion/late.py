"""``late_linear``: concatenate the features, one Linear layer (decomposable per modality)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from trainer.fusion import FUSIONS
from trainer.fusion.base import Fusion


@FUSIONS.register("late_linear")
class LateLinear(Fusion):
    """logits = [x_1; ...; x_M] W^T + b = sum_m x_m W_m^T + b, with W_m the columns of modality m."""

    decomposable = True

    def __init__(self, dims: Mapping[str, int], n_classes: int) -> None:
        super().__init__(dims, n_classes)
        self.fc = nn.Linear(sum(self.dims.values()), self.n_classes)

    @property
    def bias(self) -> torch.Tensor:
        """The bias b (n_classes,), not included in ``per_modality_logits`` unless split."""
        return self.fc.bias

    def weight_slices(self) -> dict[str, torch.Tensor]:
        """W_m (n_classes, D_m): the weight columns that act on each modality."""
        parts = torch.split(self.fc.weight, [self.dims[m] for m in self.modalities], dim=1)
        return dict(zip(self.modalities, parts))

    def per_modality_logits(
        self, features: Mapping[str, torch.Tensor], split_bias: bool = False
    ) -> dict[str, torch.Tensor]:
        """x_m W_m^T for each modality; their sum + ``bias`` is the fused logits.

        ``split_bias=True`` adds b / M to each term instead, so the terms sum to the logits.
        """
        xs = self.ordered(features)
        extra = self.fc.bias / len(self.modalities) if split_bias else None
        out = {}
        for m, x, w in zip(self.modalities, xs, self.weight_slices().values()):
            out[m] = nn.functional.linear(x, w, extra)
        return out

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat(self.ordered(features), dim=-1))
