"""``mid_mlp``: concatenate the features, a one-hidden-layer MLP."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from trainer.fusion import FUSIONS
from trainer.fusion.base import Fusion


@FUSIONS.register("mid_mlp")
class MidMLP(Fusion):
    """[x_1; ...; x_M] -> Linear(hidden) -> ReLU -> Dropout -> Linear(n_classes)."""

    decomposable = False

    def __init__(self, dims: Mapping[str, int], n_classes: int, hidden: int = 512, dropout: float = 0.1) -> None:
        super().__init__(dims, n_classes)
        self.net = nn.Sequential(
            nn.Linear(sum(self.dims.values()), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, self.n_classes),
        )

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat(self.ordered(features), dim=-1))
