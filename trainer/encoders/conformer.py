"""A batch-first Conformer (Gulati et al. 2020) with a key padding mask, and pooling helpers.

Shapes are (B, T, D) throughout; ``mask`` is (B, T) bool with True = a valid time step.
Padded steps never reach a valid step: they are zeroed on entry, excluded from attention
as keys, and zeroed again before each depthwise convolution; every other operation is
per-step. Positions are absolute sinusoidal encodings (Vaswani et al. 2017) added once after
the input projection, indexed by the step's place in the sequence, so a gap (a masked step
inside the clip) keeps the true time of the steps after it. The paper's relative positional
self-attention is not used.

``ConformerSettings`` holds the Conformer's shared settings and their defaults, once; the
encoders built on it (``face_conformer``, ``wav2vec2_conformer``) take them as flat options
(``model.encoders.audio.d_model=256``) through ``with_conformer_settings``.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from avbalance.errors import UserError


@dataclass(frozen=True)
class ConformerSettings:
    """The Conformer's shape: model width, blocks, attention heads, feed-forward multiple,
    depthwise kernel and dropout (the MLB paper's Conformer setting by default)."""

    d_model: int = 512
    n_blocks: int = 5
    n_heads: int = 8
    ff_mult: int = 4
    conv_kernel: int = 31
    dropout: float = 0.1


def with_conformer_settings(cls: type) -> type:
    """An encoder class whose ``__init__`` takes ``conformer: ConformerSettings`` accepts the
    settings as flat keyword options instead, with ``ConformerSettings``'s defaults, in that
    parameter's place: so ``{name: face_conformer, d_model: 256}`` works in a config, and the
    options a registry lists and checks (``trainer/model.py`` ``_build``) name each setting."""
    init = cls.__init__
    signature = inspect.signature(init)
    names = [f.name for f in fields(ConformerSettings)]
    flat = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=f.type)
            for f in fields(ConformerSettings)]
    params = []
    for p in signature.parameters.values():
        params.extend(flat if p.name == "conformer" else [p])

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = flat_signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        del options["self"]
        settings = ConformerSettings(**{n: options.pop(n) for n in names})
        init(self, **options, conformer=settings)

    flat_signature = signature.replace(parameters=params)
    __init__.__signature__ = flat_signature  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x (B, T, D) over the steps where mask (B, T) is True; zeros for a row with none."""
    if mask is None:
        return x.mean(dim=1)
    mask = mask.bool()
    total = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
    return total / count


def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (length, dim) sine/cosine table: sin on even channels, cos on odd ones."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


def _zero_padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


class FeedForward(nn.Module):
    """Pre-norm feed-forward module: LayerNorm, Linear(d, ff_mult * d), SiLU, Linear back."""

    def __init__(self, d_model: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, ff_mult * d_model),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv, LayerNorm over channels, SiLU, pointwise conv.

    LayerNorm replaces the paper's BatchNorm so that padded steps do not enter any
    statistics; pointwise convs are Linear layers on (B, T, D).
    """

    def __init__(self, d_model: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.glu = nn.GLU(dim=-1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.depthwise_norm = nn.LayerNorm(d_model)
        self.act = nn.SiLU()
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.glu(self.pointwise_in(self.norm(x)))
        y = _zero_padded(y, mask)
        y = self.depthwise(y.transpose(1, 2)).transpose(1, 2)
        y = self.act(self.depthwise_norm(y))
        return self.dropout(self.pointwise_out(y))


class ConformerBlock(nn.Module):
    """x + FFN/2, + MHSA, + Conv, + FFN/2, then LayerNorm (the macaron block of the paper)."""

    def __init__(self, d_model: int, n_heads: int, ff_mult: int, conv_kernel: int, dropout: float) -> None:
        super().__init__()
        self.ff1 = FeedForward(d_model, ff_mult, dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = ConvModule(d_model, conv_kernel, dropout)
        self.ff2 = FeedForward(d_model, ff_mult, dropout)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        # A row with no valid step may attend everywhere (avoids NaN); pooling drops it anyway.
        key_padding = ~mask & mask.any(dim=1, keepdim=True)
        y = self.attn_norm(x)
        y, _ = self.attn(y, y, y, key_padding_mask=key_padding, need_weights=False)
        x = x + self.attn_dropout(y)
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x)


class Conformer(nn.Module):
    """A stack of ``n_blocks`` ConformerBlocks on (B, T, d_model) with mask (B, T)."""

    def __init__(self, settings: ConformerSettings = ConformerSettings()) -> None:
        super().__init__()
        d_model, n_blocks, n_heads = settings.d_model, settings.n_blocks, settings.n_heads
        ff_mult, conv_kernel, dropout = settings.ff_mult, settings.conv_kernel, settings.dropout
        if d_model % n_heads != 0:
            raise UserError(f"conformer: d_model {d_model} must be divisible by n_heads {n_heads}")
        if conv_kernel % 2 != 1:
            raise UserError(f"conformer: conv_kernel must be odd (got {conv_kernel})")
        if d_model % 2 != 0:
            raise UserError(f"conformer: d_model must be even for sinusoidal positions (got {d_model})")
        self.blocks = nn.ModuleList(
            ConformerBlock(d_model, n_heads, ff_mult, conv_kernel, dropout) for _ in range(n_blocks)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = _zero_padded(x, mask)
        for block in self.blocks:
            x = block(x, mask)
        return x


class ConformerPooler(nn.Module):
    """Linear(in_dim -> d_model) + sinusoidal positions + Conformer + masked mean -> (B, d_model)."""

    def __init__(self, in_dim: int, settings: ConformerSettings = ConformerSettings()) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, settings.d_model)
        self.pos_dropout = nn.Dropout(settings.dropout)
        self.conformer = Conformer(settings)
        self.out_dim = settings.d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, in_dim), mask (B, T) bool or None (all valid) -> (B, d_model)."""
        b, t = x.shape[:2]
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
        mask = mask.bool()
        x = _zero_padded(x.to(self.proj.weight.dtype), mask)  # garbage (even NaN) never enters
        h = self.proj(x)
        h = self.pos_dropout(h + sinusoidal_positions(t, h.shape[-1], h.device, h.dtype))
        return masked_mean(self.conformer(h, mask), mask)
