"""The balancing-method protocol: hooks the training loop calls, and the ``BALANCERS`` registry.

One training step, as the loop runs it::

    out = model(batch["inputs"])                    # ModelOutput: fused, unimodal, features
    loss, parts = balancer.compute_loss(model, batch, out)
    loss.backward()                                 # bf16 autocast needs no loss scaling
    balancer.after_backward(model, out, batch)      # edit .grad in place
    clip_grad_norm_(...); optimizer.step()

Around it: ``build_balancer`` (construct with the config's keyword arguments, set
``total_epochs`` to the run's ``train.epochs``, ``check`` the model, ``configure`` it) runs before the optimizer is built from ``param_groups`` (a module
``configure`` adds must go to the model's device); ``attach_optimizer(optimizer)`` right
after that; on resume the model's weights load after ``configure``, then ``load_state_dict``.
Each epoch: ``on_epoch_start(model, epoch, loader, val_loader)`` ... steps ... validation ...
``on_epoch_end(model, epoch, val_metrics)`` (the evaluation dict, e.g. ``accuracy`` and
``unimodal_accuracy: {m: acc}``). ``log()`` after a step gives the coefficients.
``compute_loss``'s parts and ``log()``'s values may be device tensors: the loop reads them
only at its logging steps. On CUDA every ``float(t)``, ``t.item()``, ``t.tolist()``, ``if t``
or boolean-mask index in a hook makes the host wait for the device, every step: a hook
keeps its logging values as tensors and reads a value on the host only where its formula
needs one there, once per step if it can (docs/training.md, "The CUDA path").
Every hook gets the bare model. Under DDP the loop wraps forward and ``compute_loss``
together (``trainer.run_model.LossStep``), so extra, masked or hooked forwards inside
``compute_loss`` are part of the one DDP forward, and DDP learns which parameters get no
gradient from the loss itself; no hook needs to unwrap the model.

How the methods plug in (none needs a change to a loop that calls every hook above):

- OGM-GE: ``requires = {"decomposable_head"}``; in ``after_backward`` it splits the fused
  logits with ``model.fusion.per_modality_logits(out.features)``, scores each modality on the
  true class, scales the dominant encoder's gradients by ``1 - tanh(alpha * rho)`` and adds
  Gaussian noise matching each gradient's spread (GE); ``on_epoch_start`` records the epoch so
  modulation can stop after ``modulation_ends``.
- CGGM: ``param_groups`` puts the unimodal heads in their own group (``cls_lr``).
- AGM: ``compute_loss`` runs extra forwards ``bare(batch["inputs"], drop=S)`` (features of the
  dropped modalities zeroed) in eval mode *with* gradients, builds per-modality shares of the
  fused logits, registers a gradient hook on each share (its coefficient) and returns CE of
  their sum; it keeps running means (``state_dict``); ``after_backward`` clips the gradients
  when a fusion gradient leaves [-1, 1]. Stateful updates happen only when ``model.training``
  (``compute_loss`` may also be used for a validation loss).
- Epoch windows (OGM-GE, PMR, AGM): ``on_epoch_start`` records the epoch; the window's
  default end is the reference's scaled to ``total_epochs`` (``window.py``).
- MSLR: ``param_groups`` returns one group per modality (``modality_param_groups``, each group
  tagged ``"name"``) plus the shared one; ``on_epoch_end`` reads per-modality validation
  accuracy from ``val_metrics`` and sets those groups' ``"lr_scale"`` on ``self.optimizer``
  (set by ``attach_optimizer``); the loop's schedule multiplies every step's rate by it.
- MMCosine: ``requires = {"decomposable_head"}``; ``configure`` swaps ``model.fusion`` for a
  cosine (normalised, scaled) head over the same features, before the optimizer exists.
- PMR: ``on_epoch_start`` walks ``loader`` without gradients to compute class prototypes per
  modality (kept in ``state_dict``); ``compute_loss`` adds prototype-distance losses.
- Re-learning: ``on_epoch_start`` walks ``loader`` and ``val_loader`` for encoder features,
  scores them by clustering purity and softly re-initialises encoders in place.
- M-SAM: ``compute_loss`` scores modalities with masked forwards (Shapley values of the
  accuracy); ``after_backward`` runs a second forward/backward at SAM-perturbed weights on
  the bare model and mixes the two gradients, restoring the weights before the step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from avbalance.registry import Registry

BALANCERS: Registry = Registry("balancing method")


def _fusion_name(fusion: nn.Module) -> str:
    """The registry name of a fusion (a registered class carries it), else its class name."""
    return str(getattr(type(fusion), "name", type(fusion).__name__))


def _decomposable_names() -> str:
    from trainer.fusion import FUSIONS  # here, not at the top: the fusions need not load for a balancer

    return ", ".join(n for n in FUSIONS.names() if getattr(FUSIONS.get(n), "decomposable", False))


@dataclass(frozen=True)
class Requirement:
    """A property a method needs from the model: ``ok(model)``, else 'needs ``needs``; got ``got(model)``'."""

    needs: Callable[[], str]
    ok: Callable[[Any], bool]
    got: Callable[[Any], str]


REQUIREMENTS: dict[str, Requirement] = {
    "decomposable_head": Requirement(
        needs=lambda: f"a decomposable fusion head ({_decomposable_names()})",
        ok=lambda model: bool(getattr(model.fusion, "decomposable", False)),
        got=lambda model: _fusion_name(model.fusion),
    ),
    "multimodal": Requirement(
        needs=lambda: "at least 2 modalities",
        ok=lambda model: len(model.modalities) >= 2,
        got=lambda model: str(list(model.modalities)),
    ),
}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: add the class to ``BALANCERS`` (which sets ``cls.name``)."""
    return BALANCERS.register(name)


def cross_entropy_parts(
    out: Any, label: torch.Tensor, unimodal: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE of the fused logits (``ce_fused``) and, if ``unimodal``, of each head (``ce_<m>``); their sum."""
    parts = {"ce_fused": F.cross_entropy(out.fused, label)}
    if unimodal:
        for m, logits in out.unimodal.items():
            parts[f"ce_{m}"] = F.cross_entropy(logits, label)
    return torch.stack(list(parts.values())).sum(), parts


def to_floats(parts: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Detached Python floats, with one device sync for all of them."""
    if not parts:
        return {}
    values = torch.stack([p.detach().float().reshape(()) for p in parts.values()]).tolist()
    return dict(zip(parts.keys(), values))


def read_floats(values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Python floats of a mix of floats and 0-d tensors, with one device sync for all the tensors
    (a method's ``log()``: its per-step values stay on the device until the loop logs them)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    read = to_floats(tensors)
    return {k: float(read[k]) if k in read else float(v) for k, v in values.items()}


def log_parts(parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loss's named parts for logging, as detached tensors still on the device: reading them
    (``float(v)``) waits for the device, so the loop does it only at its logging steps
    (``train.log_every``), not at every step."""
    return {k: v.detach() for k, v in parts.items()}


def modality_param_groups(
    model: Any, base_lr: float, scale: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """One optimizer group per modality (lr ``base_lr * scale[m]``) and one ``"shared"`` group.

    The shared group holds the fusion and every trainable parameter no modality owns, so the
    groups cover the whole model; frozen parameters are left out. Groups carry ``"name"``.
    """
    scale = scale or {}
    groups, seen = [], set()
    for m, params in model.modality_params().items():
        own = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        groups.append({"name": m, "params": own, "lr": base_lr * float(scale.get(m, 1.0))})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups.append({"name": "shared", "params": rest, "lr": base_lr})
    return [g for g in groups if g["params"]]


class Balancer:
    """Base balancing method: plain CE on the fused logits; every other hook is a no-op.

    Subclasses take their options as keyword arguments (from the config) in ``__init__`` and
    override only the hooks they need. See the module docstring for the call order.
    """

    name: ClassVar[str] = "balancer"
    requires: ClassVar[frozenset[str]] = frozenset()
    # Whether a training step's loss can leave a trainable parameter of the model without a
    # gradient: CE(fused) alone leaves the unimodal heads out. The loop passes it to DDP as
    # ``find_unused_parameters`` (with ``MultimodalModel.may_skip_parameters()``, the
    # encoders' own case): False spares DDP a walk of the autograd graph after every forward
    # and a reduction of the used-parameter map in every backward, but a parameter without a
    # gradient then breaks the next step. tests/test_ddp_unused.py checks every method.
    unused_parameters: bool = True  # an instance may narrow it in ``configure`` (MSLR)
    # Balancing weighs modalities against each other: every method but ``joint`` needs two.
    min_modalities: ClassVar[int] = 2

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        # The run's epoch count (``train.epochs``), set by ``build_balancer``; None when unknown.
        # Methods with an epoch window scale their paper's window to it (``window.py``).
        self.total_epochs: int | None = None

    # -- build time --------------------------------------------------------------------
    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Raise UserError if ``model`` has too few modalities or lacks anything in ``requires``."""
        have = list(getattr(model, "modalities", []))
        if len(have) < cls.min_modalities:
            raise UserError(f"{cls.name} balances modalities against each other and needs at least "
                            f"{cls.min_modalities} modalities; this model has {len(have)} ({', '.join(have)}). "
                            "Train a one-modality control with balancing.name=joint (presets "
                            "<family>_audio_only.yaml, <family>_visual_only.yaml)")
        for req in sorted(cls.requires):
            if req not in REQUIREMENTS:
                raise ValueError(f"{cls.name}: unknown requirement {req!r}; known: {sorted(REQUIREMENTS)}")
            rule = REQUIREMENTS[req]
            if not rule.ok(model):
                raise UserError(f"{cls.name} needs {rule.needs()}; got {rule.got(model)}")

    def configure(self, model: nn.Module) -> None:
        """Change the model once (e.g. swap the head), before the optimizer is built."""

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; default one group of all trainable parameters."""
        return [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad], "lr": base_lr}]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the optimizer built from ``param_groups`` (for methods that change lrs)."""
        self.optimizer = optimizer

    # -- every step --------------------------------------------------------------------
    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named parts, for logging: detached 0-d tensors (``log_parts``),
        which the loop reads (``float``) only at its logging steps. Default: CE(fused)."""
        loss, parts = cross_entropy_parts(out, batch["label"], unimodal=False)
        return loss, log_parts(parts)

    def after_backward(self, model: nn.Module, out: Any, batch: Mapping[str, Any]) -> None:
        """Edit the (unscaled) gradients in place, before clipping and the optimizer step."""

    # -- every epoch -------------------------------------------------------------------
    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Any = None, val_loader: Any = None) -> None:
        """Before the epoch's first step; ``loader`` yields this epoch's training batches (e.g. for
        prototypes), ``val_loader`` the validation part's (e.g. for a diagnosis)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, val_metrics: Mapping[str, Any]) -> None:
        """After validation, with its metrics."""

    # -- checkpoints and logging -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors, numbers, strings, lists and dicts only."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s output."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")

    def log(self) -> dict[str, float]:
        """The current coefficients for logging, e.g. ``{"k/audio": 1.3}``."""
        return {}


def build_balancer(name: str, model: nn.Module, total_epochs: int | None = None, **kwargs: Any) -> Balancer:
    """``BALANCERS.get(name)(**kwargs)``, then ``total_epochs``, ``check(model)`` and ``configure(model)``.

    ``total_epochs`` is the run's ``train.epochs`` (None when unknown). Bad options raise
    UserError naming the accepted ones.
    """
    cls = BALANCERS.get(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        accepted = list(inspect.signature(cls).parameters)
        raise UserError(f"bad options for balancing method {name!r}: {err}; accepted: {accepted}") from None
    balancer = cls(**kwargs)
    balancer.total_epochs = None if total_epochs is None else int(total_epochs)
    balancer.check(model)
    balancer.configure(model)
    return balancer
