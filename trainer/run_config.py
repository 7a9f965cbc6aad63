"""The run config as typed, frozen dataclasses: the one place of its keys, defaults, types,
allowed values and help.

    RunConfig(name, seed, data: DataConfig, model: ModelConfig, balancing, optim: OptimConfig,
              train: TrainConfig)

Each field is declared with ``avbalance.ranges.setting`` (default, one-line help, ``Allowed``);
the ``data`` section is ``trainer/data_config.py``'s ``DataConfig``, what the loader reads.
Everything else derives from these classes: the YAML layer's nested ``DEFAULTS`` and range
``RULES`` (``trainer/config.py``), the keys ``--set`` accepts, and the key list of
``cli.py train --help`` (``settings_help``). Adding a field adds the key everywhere.

The dict stays the external form: ``trainer/config.py`` reads YAML and ``--set`` into a nested
dict, checks it and saves it as ``RUN/config.yaml``; ``RunConfig.from_dict`` gives the typed
view that the trainer below reads (``cfg.optim.lr``, ``cfg.data.batch_size``). Free-form parts
stay mappings, checked by their constructors: ``data.modalities``, ``model.encoders``,
``model.fusion`` and ``balancing``.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Iterator, Mapping

from avbalance.errors import UserError
from avbalance.ranges import Allowed, setting
from trainer.data_config import DataConfig

# Keys an older version wrote into run folders' config.yaml that nothing reads any more: read
# (so those runs still resume, evaluate and report) and dropped.
RETIRED = {("data", "eval_batch_size")}


def section(cls: type, help: str) -> Any:
    """A field holding a nested section (its own dataclass)."""
    return field(default_factory=cls, metadata={"help": help, "section": cls})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The encoders (one per modality of ``data.modalities``), the fusion and the heads."""

    n_classes: int | None = setting(None, "null: the number of classes in the shard set's shards.json",
                                    Allowed(lo=2, optional=True))
    encoders: dict[str, dict[str, Any]] = setting(
        {"audio": {"name": "resnet18_audio"}, "visual": {"name": "resnet18_visual"}},
        "modality -> {name: ENCODER, its options}, e.g. model.encoders.audio.width=16 (trainer/encoders/)",
        free_form=True)
    fusion: dict[str, Any] = setting({"name": "late_linear"}, "{name: FUSION, its options} (trainer/fusion/)",
                                     free_form=True)
    head_init: str = setting("xavier_normal", "init of the heads' and the fusion's linear layers: xavier_normal "
                                              "(the reference codes'), or torch's default",
                             Allowed(choices=("xavier_normal", "torch")))


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer and its learning-rate schedule (``trainer/optim.py``)."""

    name: str = setting("adam", "the optimizer", Allowed(choices=("adam", "adamw", "sgd")))
    lr: float = setting(1e-3, "learning rate", Allowed(lo=0, lo_open=True))
    weight_decay: float = setting(1e-4, "weight decay", Allowed(lo=0))
    momentum: float = setting(0.9, "sgd only", Allowed(lo=0, hi=1, hi_open=True))
    schedule: str = setting("none", "constant, or cosine decay after the warmup", Allowed(choices=("none", "cosine")))
    warmup_steps: int = setting(0, "steps of linear warmup", Allowed(lo=0))
    clip_grad: float = setting(0.0, "max global grad norm; 0 = off", Allowed(lo=0))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How long and where the loop runs (``trainer/loop.py``)."""

    epochs: int = setting(30, "epochs at most", Allowed(lo=1))
    patience: int = setting(10, "early stopping on validation accuracy; 0 = off", Allowed(lo=0))
    device: str = setting("auto", "auto: cuda when torch sees one, else cpu", Allowed(choices=("auto", "cpu", "cuda")))
    bf16: bool = setting(True, "bf16 autocast on CUDA")
    log_every: int = setting(10, "steps between metrics.jsonl records", Allowed(lo=1))
    deterministic: bool = setting(True, "deterministic torch algorithms")
    precise_bn: bool = setting(True, "recompute batch-norm statistics on the train part before each evaluation "
                                     "(trainer/precise_bn.py)")
    precise_bn_batches: int | None = setting(None, "at most this many train-part batches for it; null: the whole part",
                                             Allowed(lo=1, optional=True))
    compile: bool = setting(False, "torch.compile each encoder: faster GPU steps after a minute or more of "
                                   "compiling (trainer/model.py compile_encoders)")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A run's whole config, typed. ``RunConfig.from_dict`` reads the dict form."""

    name: str = setting("run", "the run's name (reports group runs by it)")
    seed: int = setting(0, "seeds the model, the data order and the augmentation", Allowed(lo=0))
    data: DataConfig = section(DataConfig, "what the loader reads and how it batches it")
    model: ModelConfig = section(ModelConfig, "encoders, fusion, heads")
    balancing: dict[str, Any] = setting({"name": "joint"}, "{name: METHOD, its options} (docs/methods.md)",
                                        free_form=True)
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    train: TrainConfig = section(TrainConfig, "the loop")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """The typed view of a config dict (as ``load_config`` returns it, or a run's saved
        ``config.yaml``). Keys it leaves out take their defaults (a config written before they
        were added); retired keys are dropped; any other unknown key is refused."""
        return _from_mapping(cls, cfg, ())


def as_run_config(cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
    """``cfg`` itself, or the typed view of its dict form: what functions that take either call first."""
    return cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)


def _from_mapping(cls: type, node: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(node, Mapping):
        raise UserError(f"config key {'.'.join(path)!r} expects a mapping, got {node!r}")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in node.items():
        here = (*path, key)
        if here in RETIRED:
            continue
        f = known.get(key)
        if f is None:
            raise UserError(f"unknown config key {'.'.join(here)!r}; known keys here: {', '.join(sorted(known))}")
        if "section" in f.metadata:
            values[key] = _from_mapping(f.metadata["section"], value, here)
        else:
            values[key] = copy.deepcopy(value)
    return cls(**values)


def _default(f: Any) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def leaves(cls: type = RunConfig, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(key path, field)`` of every setting in declaration order (sections walked; recorded
    fields left out: no user sets them)."""
    for f in fields(cls):
        if f.metadata.get("recorded"):
            continue
        if "section" in f.metadata:
            yield from leaves(f.metadata["section"], (*path, f.name))
        else:
            yield (*path, f.name), f


def defaults(cls: type = RunConfig) -> dict[str, Any]:
    """The nested dict of every setting's default, in declaration order (the YAML form: tuples as lists)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.metadata.get("recorded"):
            continue
        if "section" in f.metadata:
            out[f.name] = defaults(f.metadata["section"])
        else:
            value = _default(f)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def rules(cls: type = RunConfig) -> dict[str, Allowed]:
    """``"a.b" -> Allowed`` of every setting with a range or a set of choices."""
    return {".".join(path): f.metadata["allowed"] for path, f in leaves(cls) if f.metadata.get("allowed") is not None}


def free_form(cls: type = RunConfig) -> set[tuple[str, ...]]:
    """The key paths of the free-form mappings (checked by their constructors, not the YAML layer)."""
    return {path for path, f in leaves(cls) if f.metadata.get("free_form")}


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def settings_help() -> list[tuple[str, str]]:
    """``(KEY=DEFAULT, allowed values and help)`` for every setting, in declaration order:
    the key list of ``cli.py train --help``."""
    out = []
    for path, f in leaves():
        allowed = f.metadata.get("allowed")
        what = f"{allowed.describe()}; " if allowed is not None else ""
        out.append((f"{'.'.join(path)}={_shown(_default(f))}", what + f.metadata["help"]))
    return out
