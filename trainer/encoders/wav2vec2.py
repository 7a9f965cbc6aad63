"""``wav2vec2_conformer``: 16 kHz waveform -> wav2vec 2.0 (truncated) -> Conformer -> (B, d_model).

Weights come from ``pretrained_dir``: a local directory (config.json + weights) or a Hugging
Face model id such as ``facebook/wav2vec2-large-robust``, downloaded once into the Hugging Face
cache (``avbalance/hub.py``; with ``HF_HUB_OFFLINE=1`` an id that is not cached fails at once).
Without one the model is built from a small, randomly initialised ``Wav2Vec2Config``. The
encoder's ``weights_source`` records what was given and the weights file's sha256 (the loop
writes it to ``RUN/weights.json``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from avbalance.errors import UserError
from avbalance.hashing import sha256_file
from avbalance.hub import fetch_file, model_id
from trainer.encoders import ENCODERS
from trainer.encoders.conformer import ConformerPooler, ConformerSettings, with_conformer_settings

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


LOCAL_HINT = ("download it once, e.g. `hf download facebook/wav2vec2-large-robust --local-dir "
              "models/wav2vec2-large-robust`, and set pretrained_dir=models/wav2vec2-large-robust "
              "(a directory with config.json and model.safetensors or pytorch_model.bin)")


def check_pretrained_dir(path: str) -> str:
    """The weights file of a checkpoint directory; UserError unless it has config.json and one."""
    if not os.path.isdir(path):
        raise UserError(
            f"wav2vec2 pretrained_dir {path!r} is not a directory. Point it at a local copy of a "
            "checkpoint (config.json + model.safetensors or pytorch_model.bin), give a Hugging Face "
            "model id (e.g. facebook/wav2vec2-large-robust), or leave it out to train from a random "
            "initialisation."
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"wav2vec2 pretrained_dir {path!r} has no config.json")
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise UserError(
        f"wav2vec2 pretrained_dir {path!r} has no weights (expected one of: {', '.join(WEIGHT_FILES)})"
    )


def resolve_pretrained(spec: str) -> tuple[str, dict[str, str]]:
    """(local checkpoint directory, record) for a directory or a Hub model id.

    A model id's config.json and weights file are fetched into the Hugging Face cache (once);
    the record holds ``id`` or ``path`` and the weights file's ``sha256``.
    """
    repo = model_id(spec)
    if repo is None:
        weights = check_pretrained_dir(spec)
        return spec, {"path": os.path.abspath(spec), "sha256": sha256_file(weights)}
    what = "wav2vec2 pretrained_dir"
    config = fetch_file(repo, ("config.json",), what, LOCAL_HINT)
    weights = fetch_file(repo, ("model.safetensors", "pytorch_model.bin"), what, LOCAL_HINT)
    directory = os.path.dirname(weights)
    if os.path.dirname(config) != directory:  # both from the same snapshot (revision)
        raise UserError(f"{what}: the cached files of {repo} come from two revisions; fetch it again. {LOCAL_HINT}")
    return directory, {"id": spec, "sha256": sha256_file(weights)}


@ENCODERS.register("wav2vec2_conformer")
@with_conformer_settings
class Wav2Vec2Conformer(nn.Module):
    """Waveform x (B, N) at 16 kHz + mask (B, N) (True = a real sample) -> (B, d_model).

    - ``pretrained_dir``: a local checkpoint directory or a Hub model id (fetched into the HF
      cache once), loaded with ``local_files_only=True``; ``weights_source`` records it and the
      weights' sha256 (None for a random init). Without it, a
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
    - The Conformer's settings (``ConformerSettings``: d_model, n_blocks, n_heads, ff_mult,
      conv_kernel, dropout) are options too, after ``keep_layers``.
    """

    def __init__(
        self,
        pretrained_dir: str | None = None,
        keep_layers: int = 12,
        conformer: ConformerSettings = ConformerSettings(),
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
        self.weights_source: dict[str, str] | None = None
        if pretrained_dir:
            local, self.weights_source = resolve_pretrained(str(pretrained_dir))
            self.w2v = self._load(local, overrides)
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
        self.pooler = ConformerPooler(cfg.hidden_size, conformer)
        self.out_dim = conformer.d_model

    @staticmethod
    def _load(path: str, overrides: dict[str, Any]) -> nn.Module:
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

    def may_skip_parameters(self) -> bool:
        """Training steps may leave trainable parameters without a gradient: LayerDrop
        (``layerdrop`` > 0, the Hugging Face default 0.1) skips whole Transformer layers at
        random, and the SpecAugment mask embedding goes unused without time masking."""
        cfg = self.w2v.config
        spec_embed = getattr(self.w2v, "masked_spec_embed", None)
        unused_embed = (spec_embed is not None and spec_embed.requires_grad
                        and not (getattr(cfg, "apply_spec_augment", True) and cfg.mask_time_prob > 0))
        return float(getattr(cfg, "layerdrop", 0.0)) > 0 or unused_embed

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
