"""``wav2vec2_conformer``: 16 kHz waveform -> wav2vec 2.0 (truncated) -> Conformer -> (B, d_model).

Weights come only from a local directory (``pretrained_dir``); without one the model is built
from a small, randomly initialised ``Wav2Vec2Config``. Nothing here touches the network.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.encoders import ENCODERS
from trainer.encoders.conformer import ConformerPooler

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def frame_lengths(sample_lengths: torch.Tensor, kernels: Sequence[int], strides: Sequence[int]) -> torch.Tensor:
    """Frames of the CNN feature encoder for each input length (unpadded convolutions)."""
    lengths = sample_lengths.long()
    for kernel, stride in zip(kernels, strides):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def check_pretrained_dir(path: str) -> None:
    """Raise UserError unless ``path`` is a directory with config.json and a weights file."""
    if not os.path.isdir(path):
        raise UserError(
            f"wav2vec2 pretrained_dir {path!r} is not a directory. Point it at a local copy of a "
            "checkpoint (config.json + model.safetensors or pytorch_model.bin), or leave it out "
            "to train from a random initialisation. Nothing is ever downloaded."
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"wav2vec2 pretrained_dir {path!r} has no config.json")
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise UserError(
            f"wav2vec2 pretrained_dir {path!r} has no weights (expected one of: {', '.join(WEIGHT_FILES)})"
        )


@ENCODERS.register("wav2vec2_conformer")
class Wav2Vec2Conformer(nn.Module):
    """Waveform x (B, N) at 16 kHz + mask (B, N) (True = a real sample) -> (B, d_model).

    - ``pretrained_dir``: local checkpoint loaded with ``local_files_only=True``; otherwise a
      random model from ``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size``,
      ``cnn_dim``/``cnn_kernel``/``cnn_stride`` (the CNN feature encoder), ``pos_conv_kernel``,
      ``pos_conv_groups`` and ``feat_extract_norm`` ("layer" by default: unlike "group", its
      CNN output for the real samples does not depend on the padding).
    - Only the first ``keep_layers`` transformer layers are kept; the CNN feature encoder is
      frozen. ``layerdrop`` / ``mask_time_prob`` (SpecAugment), when given, override the config.
    - ``normalize``: zero-mean, unit-variance per clip over its real samples (what the
      wav2vec 2.0 feature extractor does). Integer input (int16 PCM) is scaled to [-1, 1).
    - ``pass_attention_mask``: give wav2vec 2.0 the attention mask. None = only for
      "layer"-norm models, following the Hugging Face advice that "group"-norm checkpoints
      (wav2vec2-base) were trained on zero padding without a mask. The Conformer and the
      pooling always use the frame mask.
    """

    def __init__(
        self,
        pretrained_dir: str | None = None,
        keep_layers: int = 12,
        d_model: int = 512,
        n_blocks: int = 5,
        n_heads: int = 8,
        ff_mult: int = 4,
        conv_kernel: int = 31,
        dropout: float = 0.1,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cnn_dim: Sequence[int] = (512,) * 7,
        cnn_kernel: Sequence[int] = (10, 3, 3, 3, 3, 2, 2),
        cnn_stride: Sequence[int] = (5, 2, 2, 2, 2, 2, 2),
        pos_conv_kernel: int = 128,
        pos_conv_groups: int = 16,
        feat_extract_norm: str = "layer",
        layerdrop: float | None = None,
        mask_time_prob: float | None = None,
        normalize: bool = True,
        pass_attention_mask: bool | None = None,
    ) -> None:
        super().__init__()
        overrides: dict[str, Any] = {}
        if layerdrop is not None:
            overrides["layerdrop"] = float(layerdrop)
        if mask_time_prob is not None:
            overrides["mask_time_prob"] = float(mask_time_prob)
        if pretrained_dir:
            self.w2v = self._load(str(pretrained_dir), overrides)
        else:
            from transformers import Wav2Vec2Config, Wav2Vec2Model

            config = Wav2Vec2Config(
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size,
                conv_dim=tuple(cnn_dim),
                conv_kernel=tuple(cnn_kernel),
                conv_stride=tuple(cnn_stride),
                num_conv_pos_embeddings=pos_conv_kernel,
                num_conv_pos_embedding_groups=pos_conv_groups,
                feat_extract_norm=feat_extract_norm,
                **overrides,
            )
            self.w2v = Wav2Vec2Model(config)
        self._truncate(keep_layers)
        self.w2v.freeze_feature_encoder()
        cfg = self.w2v.config
        self.pass_attention_mask = (
            cfg.feat_extract_norm == "layer" if pass_attention_mask is None else bool(pass_attention_mask)
        )
        self.normalize = bool(normalize)
        self.pooler = ConformerPooler(cfg.hidden_size, d_model, n_blocks, n_heads, ff_mult, conv_kernel, dropout)
        self.out_dim = d_model

    @staticmethod
    def _load(path: str, overrides: dict[str, Any]) -> nn.Module:
        check_pretrained_dir(path)
        from transformers import Wav2Vec2Model

        try:
            return Wav2Vec2Model.from_pretrained(path, local_files_only=True, **overrides)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load wav2vec2 from pretrained_dir {path!r}: {err}") from None

    def _truncate(self, keep_layers: int) -> None:
        layers = self.w2v.encoder.layers
        if not 1 <= keep_layers <= len(layers):
            raise UserError(f"wav2vec2 keep_layers must be in 1..{len(layers)} (the model's layers), not {keep_layers}")
        self.w2v.encoder.layers = nn.ModuleList(list(layers)[:keep_layers])
        self.w2v.config.num_hidden_layers = keep_layers

    def frame_mask(self, mask: torch.Tensor, n_frames: int) -> torch.Tensor:
        """(B, N) sample mask -> (B, n_frames) frame mask: the frames of the real samples."""
        cfg = self.w2v.config
        lengths = frame_lengths(mask.long().sum(dim=1), cfg.conv_kernel, cfg.conv_stride)
        return torch.arange(n_frames, device=mask.device)[None, :] < lengths[:, None]

    def _prepare(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            x = x.float() / 32768.0
        x = torch.where(mask, x.float(), torch.zeros((), device=x.device))
        if self.normalize:
            count = mask.sum(dim=1, keepdim=True).clamp(min=1)
            mean = x.sum(dim=1, keepdim=True) / count
            var = (torch.where(mask, x - mean, torch.zeros((), device=x.device)) ** 2).sum(dim=1, keepdim=True) / count
            x = torch.where(mask, (x - mean) / torch.sqrt(var + 1e-7), torch.zeros((), device=x.device))
        return x.to(self.w2v.feature_projection.projection.weight.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        mask = mask.bool()
        x = self._prepare(x, mask)
        attention_mask = mask.long() if self.pass_attention_mask else None
        hidden = self.w2v(input_values=x, attention_mask=attention_mask).last_hidden_state
        return self.pooler(hidden, self.frame_mask(mask, hidden.shape[1]))
