"""``train --resume``: a run continues with its own config.

The run's ``config.yaml`` is the record of what was trained. A resumed run may change only
what does not alter the result so far (how long it goes on, how often it logs, how many
loader workers); any other difference from ``--config``/``--set`` is refused, listed, before
anything in the run folder changes.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from avbalance import remote
from avbalance.errors import UserError
from trainer.config import DEFAULTS, deep_update, load_config

# Keys a resumed run may change: they decide how long it continues, not what it learnt.
RESUMABLE = frozenset({"train.epochs", "train.patience", "train.log_every", "data.workers", "data.prefetch",
                       "data.persistent_workers", "data.pin_memory", "train.compile",
                       # where it runs: a sweep engine may resume a run on another machine (CPU or GPU)
                       "train.device"})
# Keys whose default changed when they were added: a run written before carries on as it was.
ADDED_WITH_ANOTHER_DEFAULT = {("train", "precise_bn"): False, ("model", "head_init"): "torch"}
# Filled in by train itself, not chosen by the user; used only when a run starts (a resumed run
# loads its weights); or fixed for a run's whole life: kept as the run recorded them, never compared.
RECORDED = frozenset({"data.shards", "model.head_init",
                      # batch-norm statistics before each evaluation: they also reach methods whose training
                      # runs eval-mode forwards (AGM, PMR, relearning), so a run keeps its own setting
                      "train.precise_bn", "train.precise_bn_batches"})


def saved_config(out: str) -> dict:
    """The run's own resolved config (``RUN/config.yaml``); keys added to the defaults since
    the run was written take their default (what the run was trained with)."""
    path = os.path.join(out, "config.yaml")
    if not os.path.exists(path):
        raise UserError(f"--resume: {out} holds no config.yaml, so it is not a run folder written by train")
    with open(path, encoding="utf-8") as fh:
        try:
            cfg = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise UserError(f"--resume: {path} is not valid YAML: {err}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--resume: {path} does not hold a config mapping")
    return deep_update(DEFAULTS, with_old_defaults(cfg))


def with_old_defaults(cfg: dict) -> dict:
    """A run's saved config (in place) with the keys it predates set to what it was trained with
    (``ADDED_WITH_ANOTHER_DEFAULT``); other missing keys take today's defaults where it is read."""
    for (section, key), value in ADDED_WITH_ANOTHER_DEFAULT.items():
        if isinstance(cfg.get(section), dict):
            cfg[section].setdefault(key, value)
    return cfg


def requested_config(out: str, config: str | None, overrides: list[str]) -> dict:
    """What ``train --resume`` was asked for: ``--config`` (if given, else the run's own
    config) with the ``--set`` overrides applied."""
    if config:
        return load_config(config, overrides)
    base = saved_config(out)
    base.get("data", {}).pop("shards", None)
    return load_config(None, overrides, base=base)


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(saved: dict, requested: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, requested value)`` for every leaf that differs (recorded keys aside)."""
    a, b = _flat(saved), _flat(requested)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RECORDED:
            continue
        old, new = a.get(key, UNSET), b.get(key, UNSET)
        if old != new:
            diffs.append((key, old, new))
    return diffs


class _Unset:
    """A key one config has and the other does not."""

    def __repr__(self) -> str:
        return "nothing (the key is not set)"


UNSET = _Unset()


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value)


def resume_config(out: str, requested: dict, shards: str) -> dict:
    """The config a resumed run trains with: the saved one, plus the resumable changes asked for.

    Raises a UserError listing every other difference (and a different shard set).
    """
    saved = saved_config(out)
    diffs = config_differences(saved, requested)
    refused = [d for d in diffs if d[0] not in RESUMABLE]
    problems = [f"{key}: the run has {_shown(old)}, this command asks {_shown(new)}" for key, old, new in refused]
    recorded_shards = saved.get("data", {}).get("shards")
    if recorded_shards and remote.canonical(shards) != recorded_shards:
        problems.append(f"--shards: the run reads {recorded_shards}, this command gives {remote.canonical(shards)}")
    if problems:
        allowed = ", ".join(sorted(RESUMABLE))
        raise UserError(f"--resume continues {out} with its own config ({os.path.join(out, 'config.yaml')}), "
                        f"but this command differs: {'; '.join(problems)}. Resume without --config (the run's "
                        f"config is used) and with --set only for {allowed}; or train a new run in another --out.")
    cfg = saved
    for key, _, new in diffs:  # only resumable keys remain
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = new
    return cfg
