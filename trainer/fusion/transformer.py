"""``tf``: one token per modality plus a CLS token through a small transformer encoder."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.fusion import FUSIONS
from trainer.fusion.base import Fusion


@FUSIONS.register("tf")
class TransformerFusion(Fusion):
    """Tokens [CLS, W_1 x_1 + e_1, ..., W_M x_M + e_M] -> pre-norm encoder -> LayerNorm(CLS) -> Linear.

    e_m are learned modality embeddings; kwargs: ``d`` (token width), ``n_layers`` (2),
    ``n_heads``, ``ff_mult``, ``dropout``.
    """

    decomposable = False

    def __init__(
        self,
        dims: Mapping[str, int],
        n_classes: int,
        d: int = 256,
        n_layers: int = 2,
        n_heads: int = 4,
        ff_mult: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(dims, n_classes)
        if d % n_heads != 0:
            raise UserError(f"tf fusion: d {d} must be divisible by n_heads {n_heads}")
        self.proj = nn.ModuleDict({m: nn.Linear(dim, d) for m, dim in self.dims.items()})
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.modality_embed = nn.Parameter(torch.zeros(1, len(self.modalities), d))
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.modality_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d, n_heads, ff_mult * d, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, self.n_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        xs = self.ordered(features)
        tokens = torch.stack([self.proj[m](x) for m, x in zip(self.modalities, xs)], dim=1)
        tokens = tokens + self.modality_embed
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.fc(self.norm(self.encoder(tokens)[:, 0]))
