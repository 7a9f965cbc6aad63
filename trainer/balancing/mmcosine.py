"""``mmcosine``: Multi-Modal Cosine loss (Xu et al., "MMCosine: Multi-Modal Cosine Loss Towards
Balanced Audio-Visual Fine-Grained Learning", ICASSP 2023).

``configure`` replaces the decomposable late fusion by ``CosineLateFusion``: per modality m,

    logits_m = s * cos(x_m, W_m[c])   for each class c   (x_m and every class row of W_m L2-normalised)
    fused    = sum_m logits_m          (no bias)

with W_m the old fusion's weight columns for modality m (``weight_slices()``), copied as the
starting value; the old bias is dropped. The loss is CE on the fused logits only, as in the
paper (the unimodal heads stay untrained, as with ``joint``). Default scale s = 10.

``CosineLateFusion`` keeps ``modalities``, ``dims``, ``n_classes``, ``decomposable = True``,
``weight_slices()`` and ``per_modality_logits`` (whose terms sum exactly to the fused logits,
so ``split_bias`` changes nothing), and its parameter lives on the old weight's device and dtype.
It is not in ``FUSIONS``: it is made only by this method, and a resumed run rebuilds it in
``configure`` before the checkpoint's weights (key ``fusion.weight``) are loaded.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import Balancer, register


class CosineLateFusion(nn.Module):
    """Sum over modalities of ``scale * cos(x_m, W_m)``; one weight (n_classes, sum D_m), no bias."""

    decomposable = True

    def __init__(self, dims: Mapping[str, int], n_classes: int, scale: float = 10.0,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.modalities: list[str] = list(dims)
        self.dims: dict[str, int] = {m: int(d) for m, d in dims.items()}
        self.n_classes = int(n_classes)
        self.scale = float(scale)
        total = sum(self.dims.values())
        if weight is None:
            weight = torch.empty(self.n_classes, total)
            nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        if tuple(weight.shape) != (self.n_classes, total):
            raise ValueError(f"weight must be ({self.n_classes}, {total}), got {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone())

    @property
    def bias(self) -> None:
        """No bias: the cosine logits are used as they are."""
        return None

    def weight_slices(self) -> dict[str, torch.Tensor]:
        """W_m (n_classes, D_m), unnormalised."""
        parts = torch.split(self.weight, [self.dims[m] for m in self.modalities], dim=1)
        return dict(zip(self.modalities, parts))

    def per_modality_logits(
        self, features: Mapping[str, torch.Tensor], split_bias: bool = False
    ) -> dict[str, torch.Tensor]:
        """``scale * cos(x_m, W_m)`` per modality; they sum to the fused logits (no bias to split)."""
        if set(features) != set(self.modalities):
            raise ValueError(f"fusion expects modalities {self.modalities}, got {list(features)}")
        out = {}
        for m, w in self.weight_slices().items():
            x = F.normalize(features[m], dim=-1)
            out[m] = self.scale * F.linear(x, F.normalize(w, dim=-1))
        return out

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.per_modality_logits(features).values())).sum(dim=0)


def _old_weight(fusion: nn.Module) -> torch.Tensor:
    if hasattr(fusion, "weight_slices"):
        slices = fusion.weight_slices()
        return torch.cat([slices[m] for m in fusion.modalities], dim=1)
    return fusion.fc.weight


@register("mmcosine")
class MMCosine(Balancer):
    """CE on cosine-normalised, scaled late-fusion logits (see the module docstring)."""

    requires = frozenset({"decomposable_head"})

    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        if not scale > 0:
            raise UserError(f"mmcosine: scale must be > 0, got {scale}")
        self.scale = float(scale)

    def configure(self, model: nn.Module) -> None:
        old = model.fusion
        if isinstance(old, CosineLateFusion):
            old.scale = self.scale
            return
        weight = _old_weight(old).detach()
        fusion = CosineLateFusion(old.dims, int(weight.shape[0]), self.scale, weight)
        model.fusion = fusion.to(device=weight.device, dtype=weight.dtype)

    def log(self) -> dict[str, float]:
        return {"scale": self.scale}
