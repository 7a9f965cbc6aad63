"""Training configuration: YAML files over built-in defaults, ``--set a.b=c`` overrides.

Every key must exist in the defaults (or sit under a free-form section: the encoder, fusion
and balancing arguments, checked by the constructors), and every override must keep the
default's type: a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from avbalance.errors import UserError

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "data": {
        "train_part": "train",
        "val_part": "val",  # falls back to test when the split has no val part (ogm)
        "test_part": "test",
        "modalities": {"audio": "spec", "visual": "frames"},
        "batch_size": 16,
        "eval_batch_size": 32,
        "workers": 2,
        "shuffle_buffer": 256,
        "frames": 3,
        "image_size": 224,
        "max_face_frames": 300,
        "max_wav_seconds": 6.0,
        "samples_per_epoch": None,
        "exclude_quality": [],  # quality flags to drop (docs/shards.md); none: the published protocol keeps every clip
        "on_corrupt": "error",  # error | skip: a damaged shard or sample stops the run, or is skipped and counted
    },
    "model": {
        "n_classes": 6,
        "encoders": {
            "audio": {"name": "resnet18_audio"},
            "visual": {"name": "resnet18_visual"},
        },
        "fusion": {"name": "late_linear"},
    },
    "balancing": {"name": "joint"},
    "optim": {
        "name": "adam",  # adam | adamw | sgd
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "momentum": 0.9,  # sgd only
        "schedule": "none",  # none | cosine
        "warmup_steps": 0,
        "clip_grad": 0.0,  # max global grad norm; 0 = off
    },
    "train": {
        "epochs": 30,
        "patience": 10,  # early stopping on validation accuracy; 0 = off
        "device": "auto",  # auto | cpu | cuda
        "bf16": True,  # bf16 autocast on CUDA
        "log_every": 10,
        "deterministic": True,
    },
}
FREE_FORM = {("model", "encoders"), ("model", "fusion"), ("balancing",), ("data", "modalities")}


def _free(path: tuple[str, ...]) -> bool:
    return any(path[: len(f)] == f for f in FREE_FORM)


def merge(base: dict, update: dict, path: tuple[str, ...] = ()) -> dict:
    """Recursively merge ``update`` into a copy of ``base``, refusing unknown keys."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        here = (*path, key)
        if _free(here):
            out[key] = _merge_free(out.get(key), value)
            continue
        if key not in out:
            known = ", ".join(sorted(out))
            raise UserError(f"unknown config key {'.'.join(here)!r}; known keys here: {known}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, here)
        else:
            out[key] = _typed(here, out[key], value)
    return out


def _merge_free(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return _deep_update(old, new)
    return copy.deepcopy(new)


def _typed(path: tuple[str, ...], default: Any, value: Any) -> Any:
    """``value`` if it fits the default's type (ints widen to floats), else a UserError."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"config key {'.'.join(path)!r} expects {type(default).__name__}, got {value!r}")
    return value


def parse_override(text: str) -> dict:
    """``a.b=c`` -> {"a": {"b": yaml(c)}}."""
    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise UserError(f"--set {key}: cannot parse {raw!r}: {err}") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | None, overrides: list[str] = ()) -> dict:
    """Defaults <- YAML file (with optional ``base:`` file it extends) <- --set overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        cfg = merge(cfg, _read_yaml(path))
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    check_data_quality_keys(cfg)
    return cfg


def check_data_quality_keys(cfg: dict) -> None:
    """``data.exclude_quality`` names known quality flags; ``data.on_corrupt`` is error or skip."""
    from pipelines.quality import QUALITY_FLAGS

    data = cfg["data"]
    flags = data["exclude_quality"]
    unknown = [f for f in flags if f not in QUALITY_FLAGS]
    if unknown:
        raise UserError(f"data.exclude_quality: unknown quality flag(s) {', '.join(map(str, unknown))}; "
                        f"allowed: {', '.join(QUALITY_FLAGS)} (or [] to keep every clip)")
    if data["on_corrupt"] not in ("error", "skip"):
        raise UserError(f"data.on_corrupt is {data['on_corrupt']!r}; allowed: error (stop at a damaged shard or sample) "
                        "or skip (skip it, count it in the run's metrics)")


def _read_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"config file {path} does not exist (presets live in trainer/configs/)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base:
        parent = _read_yaml(os.path.join(os.path.dirname(path), base))
        data = _deep_update(parent, data)
    return data


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _deep_update(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else copy.deepcopy(v)
    return out


def save_config(cfg: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
