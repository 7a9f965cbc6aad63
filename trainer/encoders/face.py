"""``face_conformer``: per-frame face features (B, T, 1408) -> Conformer -> (B, d_model)."""

from __future__ import annotations

import torch
from torch import nn

from trainer.encoders import ENCODERS
from trainer.encoders.conformer import ConformerPooler


@ENCODERS.register("face_conformer")
class FaceConformer(nn.Module):
    """Face features x (B, T, in_dim) + mask (B, T) (True = a frame with a face) -> (B, d_model).

    Frames without a face keep their time slot (mask False): they are ignored by attention,
    by the convolution module and by the pooling. float16 input is cast to the weights' dtype.
    The features are layer-normalised first: their scale depends on the extractor's weights
    (a randomly initialised EfficientNet gives activations around 1e-5).
    """

    def __init__(
        self,
        in_dim: int = 1408,
        d_model: int = 512,
        n_blocks: int = 5,
        n_heads: int = 8,
        ff_mult: int = 4,
        conv_kernel: int = 31,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.pooler = ConformerPooler(in_dim, d_model, n_blocks, n_heads, ff_mult, conv_kernel, dropout)
        self.out_dim = d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.norm.weight.dtype)
        if mask is not None:
            x = torch.where(mask.bool()[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.pooler(self.norm(x), mask)
