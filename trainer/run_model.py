"""The model exactly as a run trains it: the inputs each encoder reads, the model with its
balancing method, and forward plus the method's loss as the one module DDP wraps.

Training, ``cli.py evaluate``, resume and the benchmarks build the model here, so that a
checkpoint always loads into the model that wrote it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from avbalance.errors import UserError
from trainer.model import MultimodalModel, build_model
from trainer.run_config import RunConfig, as_run_config

if TYPE_CHECKING:
    from trainer.balancing import Balancer


# Which shard source each encoder reads.
ENCODER_SOURCES = {"resnet18_audio": "spec", "resnet18_visual": "frames", "resnet18_flow": "flow", "face_conformer": "face_feats", "wav2vec2_conformer": "wav"}


def check_inputs(cfg: RunConfig | Mapping[str, Any]) -> None:
    """The data must feed every encoder, with the input that encoder reads (``cfg`` typed, or its dict form)."""
    cfg = as_run_config(cfg)
    sources, encoders = cfg.data.modalities, cfg.model.encoders
    if set(sources) != set(encoders):
        raise UserError(f"data.modalities {sorted(sources)} and model.encoders {sorted(encoders)} must name the same modalities")
    for m, spec in encoders.items():
        wanted = ENCODER_SOURCES.get(spec.get("name"))
        if wanted and sources[m] != wanted:
            raise UserError(f"modality {m!r}: encoder {spec['name']} reads {wanted!r}, but data.modalities.{m} is {sources[m]!r}")


def build_run_model(cfg: RunConfig | Mapping[str, Any], device: torch.device | str = "cpu") -> tuple[MultimodalModel, Balancer]:
    """The model exactly as the run trains it, and its balancing method (``cfg`` typed, or its dict form).

    The method's ``configure`` may change the model (MMCosine swaps the fusion head), so
    anything that loads a run's weights (``evaluate``, resume) builds it here too.
    """
    from trainer.balancing import build_balancer

    cfg = as_run_config(cfg)
    model = build_model(cfg.model).to(device)
    options = dict(cfg.balancing)
    balancer = build_balancer(options.pop("name"), model, total_epochs=cfg.train.epochs, **options)
    return model, balancer


class _Held:
    """Carries values out of ``LossStep.forward`` where DDP does not look for tensors."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)


class LossStep(torch.nn.Module):
    """Forward and the method's loss as one module: what DDP wraps.

    DDP finds the parameters that get no gradient by walking back from what ``forward``
    returns. Returning the model's outputs would make every head look used, though a method
    may ignore some (joint leaves the unimodal heads without a loss) and so hang the next
    reduction. Returning the loss itself, with every extra, masked or hooked forward of
    ``compute_loss`` inside this one call, lets DDP see exactly what the method used.
    """

    def __init__(self, model: torch.nn.Module, balancer) -> None:
        super().__init__()
        self.model = model
        self.balancer = balancer  # not a Module: its parameters (if any) live in the model

    def forward(self, batch: dict) -> tuple[torch.Tensor, _Held]:
        out = self.model(batch["inputs"])
        loss, parts = self.balancer.compute_loss(self.model, batch, out)
        return loss, _Held(out=out, parts=parts)
