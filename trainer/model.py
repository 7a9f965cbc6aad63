"""The multimodal model: one encoder and one unimodal head per modality, and a fusion."""

from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.encoders import ENCODERS
from trainer.fusion import FUSIONS
from trainer.run_config import ModelConfig


@dataclass
class ModelOutput:
    """``fused`` (B, C) logits; per modality ``unimodal`` (B, C) head logits and ``features`` (B, D_m)."""

    fused: torch.Tensor
    unimodal: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]


def _batch_size(inputs: Mapping[str, Mapping[str, Any]]) -> int:
    for kwargs in inputs.values():
        for value in kwargs.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    raise ValueError("cannot tell the batch size: no tensor among the inputs")


class MultimodalModel(nn.Module):
    """Encoders (a ModuleDict, in modality order), a Linear unimodal head each, and a fusion.

    ``forward(inputs, drop)``: ``inputs[m]`` is the keyword dict for encoder m, e.g.
    ``{"x": spec}`` or ``{"x": frames, "mask": mask}``. A modality in ``drop`` is not encoded:
    its features are zeros (B, D_m), which both the fusion and its head see (its input may
    then be left out of ``inputs``).
    """

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module, n_classes: int) -> None:
        super().__init__()
        if not encoders:
            raise UserError("the model needs at least one encoder")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.heads = nn.ModuleDict({m: nn.Linear(int(e.out_dim), n_classes) for m, e in encoders.items()})
        self.fusion = fusion
        self.n_classes = n_classes
        fusion_modalities = getattr(fusion, "modalities", None)
        if fusion_modalities is not None and list(fusion_modalities) != self.modalities:
            raise UserError(f"fusion modalities {list(fusion_modalities)} differ from encoders {self.modalities}")

    @property
    def modalities(self) -> list[str]:
        """Modality names in their fixed order."""
        return list(self.encoders.keys())

    @property
    def dims(self) -> dict[str, int]:
        """Feature size per modality."""
        return {m: int(e.out_dim) for m, e in self.encoders.items()}

    def encode(self, m: str, inputs: Mapping[str, Any] | None, batch_size: int) -> torch.Tensor:
        """Features (B, D_m) of modality m, or zeros when ``inputs`` is None (dropped)."""
        if inputs is None:
            head = self.heads[m].weight
            return torch.zeros(batch_size, self.dims[m], dtype=head.dtype, device=head.device)
        return self.encoders[m](**inputs)

    def forward(
        self, inputs: Mapping[str, Mapping[str, Any]], drop: Collection[str] = frozenset()
    ) -> ModelOutput:
        unknown = set(drop) - set(self.modalities)
        if unknown:
            raise ValueError(f"cannot drop unknown modalities {sorted(unknown)}; have {self.modalities}")
        missing = [m for m in self.modalities if m not in drop and m not in inputs]
        if missing:
            raise ValueError(f"no inputs for modalities {missing}")
        batch_size = _batch_size(inputs)
        features = {m: self.encode(m, None if m in drop else inputs[m], batch_size) for m in self.modalities}
        unimodal = {m: self.heads[m](features[m]) for m in self.modalities}
        return ModelOutput(fused=self.fusion(features), unimodal=unimodal, features=features)

    def modality_params(self, trainable_only: bool = False) -> dict[str, list[nn.Parameter]]:
        """Per modality: the parameters of its encoder and of its unimodal head (by module ownership)."""
        out = {}
        for m in self.modalities:
            params = [*self.encoders[m].parameters(), *self.heads[m].parameters()]
            out[m] = [p for p in params if p.requires_grad] if trainable_only else params
        return out

    def shared_params(self, trainable_only: bool = False) -> list[nn.Parameter]:
        """The fusion's parameters (shared by all modalities)."""
        return [p for p in self.fusion.parameters() if p.requires_grad or not trainable_only]

    def may_skip_parameters(self) -> bool:
        """Whether a training forward may leave some trainable parameter of an encoder out of the
        graph, whatever the loss (Wav2Vec2's LayerDrop skips whole layers at random): DDP then
        needs ``find_unused_parameters`` (the loop's wrap, with the method's ``unused_parameters``)."""
        return any(bool(getattr(e, "may_skip_parameters", lambda: False)()) for e in self.encoders.values())


def _build(registry: Any, kind: str, spec: Mapping[str, Any], *args: Any) -> nn.Module:
    """``registry.get(spec["name"])(*args, **rest of spec)``, with option errors as UserError."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise UserError(f"{kind} config needs a 'name' (one of {registry.names()}), got {spec!r}")
    options = {k: v for k, v in spec.items() if k != "name"}
    factory = registry.get(spec["name"])
    try:
        inspect.signature(factory).bind(*args, **options)
    except TypeError as err:
        params = [p for p in inspect.signature(factory).parameters][len(args):]
        raise UserError(f"bad options for {kind} {spec['name']!r}: {err}; accepted: {params}") from None
    return factory(*args, **options)


def _seeded_per_modality(modality: str, make: Callable[[], nn.Module]) -> nn.Module:
    """Build one encoder from a random stream of its own: (the run's seed, the modality name).

    So a modality's encoder starts from the same weights in every model that has it (a
    unimodal control, joint training, any balancing method, with the other modality's
    encoder bigger or smaller): comparisons between methods are paired down to the init.
    """
    seed = (torch.initial_seed() * 1_000_003 + zlib.crc32(modality.encode())) % (2**63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


HEAD_INITS = ("xavier_normal", "torch")


def init_heads(model: MultimodalModel, how: str) -> None:
    """Initialise every Linear layer of the unimodal heads and of the fusion.

    ``xavier_normal``: Xavier-normal weights and zero biases, as the balancing literature's
    reference code does (GeWu-Lab/OGM-GE_CVPR2022 ``utils/utils.py`` ``weight_init``, applied by
    its ``main.py`` and by the codes built on it: AGM, PMR, MMPareto). For a 1024 -> 6 head that
    is a weight std of 0.044, against 0.018 for torch's default (Kaiming-uniform with a = sqrt(5)),
    and under SGD the encoders' gradients scale with it (docs/methods.md, "Parity with the
    reference code"). ``torch``: the layers as torch initialised them.
    """
    if how not in HEAD_INITS:
        raise UserError(f"model.head_init must be one of {', '.join(HEAD_INITS)}, not {how!r}")
    if how == "torch":
        return
    for module in [*model.heads.modules(), *model.fusion.modules()]:
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> MultimodalModel:
    """Build from the run config's ``model`` section (``ModelConfig``), or from a mapping
    ``{"n_classes": C, "encoders": {m: {"name": ..., **kw}}, "fusion": {"name": ..., **kw}, "head_init": ...}``.

    The order of ``encoders`` is the modality order. ``head_init`` (default ``torch`` in a
    mapping, for code that builds models directly; the run config's default is
    ``xavier_normal``) is ``init_heads``'s.
    """
    if not isinstance(cfg, ModelConfig):
        for key in ("n_classes", "encoders", "fusion"):
            if key not in cfg:
                raise UserError(f"model config needs {key!r} (has {sorted(cfg)})")
        cfg = ModelConfig(n_classes=cfg["n_classes"], encoders=cfg["encoders"], fusion=cfg["fusion"],
                          head_init=cfg.get("head_init", "torch"))
    if cfg.n_classes is None:  # train fills it from shards.json (trainer/corpus.py)
        raise UserError("model.n_classes is not set: `train` takes it from the shard set's shards.json; "
                        "set model.n_classes to build a model without one")
    n_classes = int(cfg.n_classes)
    if not isinstance(cfg.encoders, Mapping) or not cfg.encoders:
        raise UserError("model config 'encoders' must map modality names to encoder configs")
    encoders = {m: _seeded_per_modality(m, lambda: _build(ENCODERS, "encoder", spec)) for m, spec in cfg.encoders.items()}
    dims = {m: int(e.out_dim) for m, e in encoders.items()}
    fusion = _build(FUSIONS, "fusion", cfg.fusion, dims, n_classes)
    model = MultimodalModel(encoders, fusion, n_classes)
    init_heads(model, cfg.head_init)
    return model


def compile_encoders(model: MultimodalModel, backend: str = "inductor") -> None:
    """``train.compile``: ``torch.compile`` each encoder in place (``nn.Module.compile``).

    The encoders hold nearly all of a step's work; the heads, the fusion and a method's loss
    are a few small ops. Compiling per encoder rather than the whole model keeps each graph
    whole: the model's loop over modalities, and a frame gather whose size depends on the mask
    (``resnet18_visual``), would split one graph into many. In place, so parameter names, the
    state dict, checkpoints and DDP are unchanged. Training, evaluation and the no-grad
    batch-norm pass each compile once (a new batch size recompiles once, with dynamic shapes).
    """
    for encoder in model.encoders.values():
        encoder.compile(backend=backend)
