"""Training configuration: YAML files over built-in defaults, ``--set a.b=c`` overrides.

The keys, defaults, types, ranges and help are the dataclasses of ``trainer/run_config.py``
(``RunConfig``); here is the YAML layer over them, working on the dict form: ``DEFAULTS`` and
``RULES`` derive from those classes, ``load_config`` merges and checks, ``save_config`` writes
``RUN/config.yaml``, and ``RunConfig.from_dict`` gives the typed view the trainer reads.

Every key must exist in the defaults (or sit under a free-form section: the encoder, fusion
and balancing arguments, checked by the constructors), and every override must keep the
default's type: a typo fails loudly instead of being ignored.

``data.modalities`` decides which modalities the model has. Whatever sets it (a preset, the
file a preset extends, ``--set data.modalities={visual: frames}``) replaces the whole mapping
instead of merging into it, and ``model.encoders`` keeps only the encoders of those
modalities: so one ``--set`` turns a two-modality preset into a one-modality model.
(``--set data.modalities.face=face_feats`` adds one modality to the mapping.)
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from avbalance.errors import UserError
from avbalance.ranges import Allowed
from avbalance.shard_format import QUALITY_FLAGS
from trainer.run_config import RETIRED, defaults, free_form, rules

# The nested dict the YAML layer merges over, the range of each numeric or named setting and
# the free-form mappings: all derived from the dataclasses of trainer/run_config.py, the one
# place of the keys, defaults, types, ranges and help. The ranges are checked where the config
# is read, so a bad value fails at once instead of hanging a loader or dividing by zero later.
DEFAULTS: dict[str, Any] = defaults()
RULES: dict[str, Allowed] = rules()
FREE_FORM: set[tuple[str, ...]] = free_form()


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
        if here in RETIRED:
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
        return deep_update(old, new)
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


def select_modalities(cfg: dict, modalities: Any) -> dict:
    """``cfg`` with ``data.modalities`` replaced by ``modalities`` and ``model.encoders`` narrowed
    to the same modalities (an encoder for a modality the data no longer feeds is dropped)."""
    if not isinstance(modalities, dict) or not modalities:
        raise UserError(f"data.modalities must map at least one modality to its source, e.g. {{visual: frames}}; "
                        f"got {modalities!r}")
    out = copy.deepcopy(cfg)
    out.setdefault("data", {})["modalities"] = copy.deepcopy(modalities)
    encoders = out.get("model", {}).get("encoders")
    if isinstance(encoders, dict):
        out["model"]["encoders"] = {m: e for m, e in encoders.items() if m in modalities}
    return out


def _modalities_of(layer: dict) -> Any:
    """The ``data.modalities`` a config layer sets, or None."""
    data = layer.get("data")
    return data.get("modalities") if isinstance(data, dict) else None


PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def resolve_preset(path: str) -> str:
    """A YAML file as given, or a shipped preset by name (``resnet_small`` ->
    ``trainer/configs/resnet_small.yaml``), so ``--config NAME`` works from any folder."""
    if os.path.exists(path) or os.sep in path or "/" in path:
        return path
    named = os.path.join(PRESETS_DIR, path if path.endswith(".yaml") else f"{path}.yaml")
    return named if os.path.exists(named) else path


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """Defaults (or ``base``, e.g. a run's saved config) <- YAML file or preset name (with
    optional ``base:`` file it extends) <- --set overrides; every value checked against its range."""
    cfg = copy.deepcopy(DEFAULTS if base is None else base)
    if path:
        path = resolve_preset(path)
        layer = _read_yaml(path)
        cfg = merge(cfg, layer)
        if _modalities_of(layer) is not None:
            cfg = select_modalities(cfg, _modalities_of(layer))
    for text in overrides:
        layer = parse_override(text)
        cfg = merge(cfg, layer)
        # data.modalities (or data) itself replaces the mapping; data.modalities.<m> adds to it.
        if text.split("=", 1)[0].strip() in ("data", "data.modalities") and _modalities_of(layer) is not None:
            cfg = select_modalities(cfg, _modalities_of(layer))
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict) -> None:
    """Refuse a value outside its range (``RULES``) at once, naming the key, the value and what is allowed."""
    for key, rule in RULES.items():
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None and rule.optional:
            continue
        rule.check(key, node)
    check_data_quality_keys(cfg)


def check_data_quality_keys(cfg: dict) -> None:
    """``data.exclude_quality`` names known quality flags."""
    data = cfg["data"]
    flags = data["exclude_quality"]
    unknown = [f for f in flags if f not in QUALITY_FLAGS]
    if unknown:
        raise UserError(f"data.exclude_quality: unknown quality flag(s) {', '.join(map(str, unknown))}; "
                        f"allowed: {', '.join(QUALITY_FLAGS)} (or [] to keep every clip)")


def _read_yaml(path: str) -> dict:
    if not os.path.exists(path):
        names = sorted(n[:-5] for n in os.listdir(PRESETS_DIR) if n.endswith(".yaml") and not n.endswith("_base.yaml"))
        raise UserError(f"config file {path} does not exist; give a YAML file or a preset's name "
                        f"({', '.join(names)}; in {PRESETS_DIR})")
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
        modalities = _modalities_of(data)
        data = deep_update(parent, data)
        if modalities is not None:  # the preset's modalities replace its base's
            data = select_modalities(data, modalities)
    return data


def deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = deep_update(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else copy.deepcopy(v)
    return out


def save_config(cfg: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
