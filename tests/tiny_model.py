"""A tiny real ``MultimodalModel`` (two tanh-linear encoders, a real fusion) and a batch for it."""

from __future__ import annotations

import torch
from torch import nn

from trainer.fusion import FUSIONS
from trainer.model import MultimodalModel

N_CLASSES = 4
MODS = ("audio", "visual")


class TinyEncoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


def make(seed: int = 0, batch_size: int = 6, dim: int = 5, in_dim: int = 3, fusion: str = "late_linear"):
    """(model, batch): encoder i reads ``in_dim + i`` features; labels cycle through the classes."""
    torch.manual_seed(seed)
    encoders = {m: TinyEncoder(in_dim + i, dim) for i, m in enumerate(MODS)}
    model = MultimodalModel(encoders, FUSIONS.get(fusion)({m: dim for m in MODS}, N_CLASSES), N_CLASSES)
    batch = {
        "inputs": {m: {"x": torch.randn(batch_size, in_dim + i)} for i, m in enumerate(MODS)},
        "label": torch.arange(batch_size) % N_CLASSES,
    }
    return model, batch
