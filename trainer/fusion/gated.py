"""``gated``: OGM-GE's gated fusion (Kiela et al. 2018, "Efficient Large-Scale Multi-Modal
Classification"), as GeWu-Lab/OGM-GE_CVPR2022 ``models/fusion_modules.py`` ``GatedFusion``
builds it with ``x_gate=True`` and kkontras/MLB ``models/fusion_gates.py`` uses it:

    out_x  = W_x x + b_x        out_y = W_y y + b_y        (each Linear(D, hidden))
    logits = W_out (sigmoid(out_x) * out_y) + b_out

with x the gating modality (``gate``; default the first, audio in the reference) and y the
other one. For M > 2 the gated term is the sum of the other modalities' projections,
h = sigmoid(W_g x_g) * sum_{m != g} W_m x_m, which is the reference's for M = 2.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.fusion import FUSIONS
from trainer.fusion.base import Fusion


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """logits = fc_out(sigmoid(proj[gate](x_gate)) * sum_{m != gate} proj[m](x_m)); not decomposable."""

    decomposable = False
    min_modalities = 2  # one modality gates the others

    def __init__(self, dims: Mapping[str, int], n_classes: int, hidden: int = 512, gate: str | None = None) -> None:
        super().__init__(dims, n_classes)
        self.gate = gate if gate is not None else self.modalities[0]
        if self.gate not in self.dims:
            raise UserError(f"gated fusion: gate {self.gate!r} is not one of the modalities {self.modalities}")
        self.hidden = int(hidden)
        self.proj = nn.ModuleDict({m: nn.Linear(d, self.hidden) for m, d in self.dims.items()})
        self.fc = nn.Linear(self.hidden, self.n_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        xs = dict(zip(self.modalities, self.ordered(features)))
        gate = torch.sigmoid(self.proj[self.gate](xs[self.gate]))
        gated = sum(self.proj[m](x) for m, x in xs.items() if m != self.gate)
        return self.fc(gate * gated)
