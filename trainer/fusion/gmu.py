"""``gmu``: a gated multimodal unit (Arevalo et al. 2017), softmax-generalised to M modalities.

Registered as ``gated`` before; that name is now OGM-GE's gated fusion (``gated.py``), the one
the OGM-GE, PMR and MLB papers' "gated" rows use."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from trainer.fusion import FUSIONS
from trainer.fusion.base import Fusion


@FUSIONS.register("gmu")
class GMUFusion(Fusion):
    """h = sum_m z_m * tanh(W_m x_m), z = softmax over m of W_z [x_1; ...; x_M] (per hidden unit).

    With M = 2, softmax over two gates is sigmoid(a - b): the GMU's z and 1 - z. Then
    Dropout and Linear(hidden, n_classes).
    """

    decomposable = False

    def __init__(self, dims: Mapping[str, int], n_classes: int, hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__(dims, n_classes)
        self.hidden = hidden
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in self.dims.items()})
        self.gate = nn.Linear(sum(self.dims.values()), len(self.modalities) * hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, self.n_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        xs = self.ordered(features)
        h = torch.stack([torch.tanh(self.proj[m](x)) for m, x in zip(self.modalities, xs)], dim=1)
        z = self.gate(torch.cat(xs, dim=-1)).view(-1, len(self.modalities), self.hidden).softmax(dim=1)
        return self.fc(self.dropout((z * h).sum(dim=1)))
