"""``film``: feature-wise linear modulation (Perez et al. 2018) of one modality by another."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.fusion import FUSIONS
from trainer.fusion.base import Fusion


@FUSIONS.register("film")
class FiLMFusion(Fusion):
    """h_t = (1 + dgamma(x_c)) * x_t + beta(x_c) for (target t, conditioner c) pairs, concat, Linear.

    - ``mode="source"`` (default): one modality, ``conditioner`` (default the first), modulates
      every other modality; only the modulated features reach the classifier. With M = 2 this
      is the reference FiLM baseline (audio conditions visual).
    - ``mode="ring"``: each modality is modulated by the next one (the last by the first).
    gamma is predicted as 1 + dgamma so that a fresh layer starts close to the identity.
    """

    decomposable = False
    min_modalities = 2  # one modality modulates another

    def __init__(
        self, dims: Mapping[str, int], n_classes: int, mode: str = "source", conditioner: str | None = None
    ) -> None:
        super().__init__(dims, n_classes)
        mods = self.modalities
        if mode == "source":
            source = conditioner if conditioner is not None else mods[0]
            if source not in mods:
                raise UserError(f"film conditioner {source!r} is not one of the modalities {mods}")
            self.pairs = [(t, source) for t in mods if t != source]
        elif mode == "ring":
            if conditioner is not None:
                raise UserError("film: conditioner applies to mode 'source' only")
            self.pairs = [(t, mods[(i + 1) % len(mods)]) for i, t in enumerate(mods)]
        else:
            raise UserError(f"film mode must be 'source' or 'ring', not {mode!r}")
        self.mode = mode
        self.generators = nn.ModuleDict(
            {t: nn.Linear(self.dims[c], 2 * self.dims[t]) for t, c in self.pairs}
        )
        self.fc = nn.Linear(sum(self.dims[t] for t, _ in self.pairs), self.n_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.ordered(features)  # checks the keys
        parts = []
        for target, cond in self.pairs:
            dgamma, beta = self.generators[target](features[cond]).chunk(2, dim=-1)
            parts.append((1 + dgamma) * features[target] + beta)
        return self.fc(torch.cat(parts, dim=-1))
