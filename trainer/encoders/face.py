"""``face_conformer``: per-frame face features (B, T, 1408) -> Conformer -> (B, d_model)."""

from __future__ import annotations

import torch
from torch import nn

from trainer.encoders import ENCODERS
from trainer.encoders.conformer import ConformerPooler, ConformerSettings, with_conformer_settings


@ENCODERS.register("face_conformer")
@with_conformer_settings
class FaceConformer(nn.Module):
    """Face features x (B, T, in_dim) + mask (B, T) (True = a frame with a face) -> (B, d_model).

    Frames without a face keep their time slot (mask False): they are ignored by attention,
    by the convolution module and by the pooling. float16 input is cast to the weights' dtype.
    The features are layer-normalised first: their scale depends on the extractor's weights
    (a randomly initialised EfficientNet gives activations around 1e-5). Options: ``in_dim`` and
    the Conformer's settings (``ConformerSettings``: d_model, n_blocks, n_heads, ff_mult,
    conv_kernel, dropout).
    """

    def __init__(self, in_dim: int = 1408, conformer: ConformerSettings = ConformerSettings()) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.pooler = ConformerPooler(in_dim, conformer)
        self.out_dim = conformer.d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.norm.weight.dtype)
        if mask is not None:
            x = torch.where(mask.bool()[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.pooler(self.norm(x), mask)
