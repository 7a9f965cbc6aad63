"""The base class of fusions: modality order, dims and input checks."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from avbalance.errors import UserError


class Fusion(nn.Module):
    """Holds ``modalities`` (ordered), ``dims`` and ``n_classes``; subclasses set ``decomposable``."""

    decomposable: bool = False
    min_modalities: int = 1  # how many modalities the fusion needs (the sweep reads it before building)

    def __init__(self, dims: Mapping[str, int], n_classes: int, min_modalities: int | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        min_modalities = type(self).min_modalities if min_modalities is None else min_modalities
        if len(dims) < min_modalities:
            raise UserError(f"{name} needs at least {min_modalities} modalities, got {list(dims)}")
        if n_classes < 1 or any(int(d) < 1 for d in dims.values()):
            raise UserError(f"{name}: n_classes and every feature dim must be >= 1 (got {n_classes}, {dict(dims)})")
        self.modalities: list[str] = list(dims)
        self.dims: dict[str, int] = {m: int(d) for m, d in dims.items()}
        self.n_classes = int(n_classes)

    def ordered(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The features in modality order; the keys must be exactly the fusion's modalities."""
        if set(features) != set(self.modalities):
            raise ValueError(f"fusion expects modalities {self.modalities}, got {list(features)}")
        return [features[m] for m in self.modalities]
