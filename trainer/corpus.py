"""What a run takes from its shard set: the number of classes and their names, and the
settings the corpus needs (its recipe's ``train_defaults``, e.g. AVE's frame sampling).

A preset states no class count, so it trains on any corpus unchanged: ``model.n_classes``
defaults to the length of ``classes`` in ``shards.json``; a value given explicitly must
agree with it. Config keys whose built-in default is None (``FALLBACKS``) take the shard
set's value when it has one, else the fallback; a value the user gave always wins.
"""

from __future__ import annotations

import copy
from typing import Any

from avbalance.errors import UserError
from avbalance.invocation import prog

# key -> the value when neither the user nor the shard set gives one
FALLBACKS: dict[str, Any] = {"data.frame_sampling": "consecutive"}
# Shard sets written before ``classes`` was recorded were all CREMA-D's (6 emotions).
LEGACY_CLASSES = {"cremad": ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]}


def shard_classes(index: dict) -> list[str] | None:
    """The class names of a shard set in label order, or None when its index does not say."""
    classes = index.get("classes")
    if classes:
        return list(classes)
    return LEGACY_CLASSES.get(index.get("corpus", ""))


def _get(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(cfg: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def apply_shard_set(cfg: dict, index: dict, shards: str) -> dict:
    """``cfg`` with ``model.n_classes`` and the corpus defaults resolved from ``index``
    (the shard set's ``shards.json``); a clear error when they cannot agree."""
    out = copy.deepcopy(cfg)
    classes = shard_classes(index)
    given = out["model"].get("n_classes")
    if classes is None:
        if given is None:
            raise UserError(f"{shards}/shards.json does not name its classes (written by an older version for corpus "
                            f"{index.get('corpus')!r}): re-run `{prog()} preprocess`, or set model.n_classes")
    elif given is None:
        out["model"]["n_classes"] = len(classes)
    elif int(given) != len(classes):
        raise UserError(f"model.n_classes is {given}, but the shard set {shards} has {len(classes)} classes "
                        f"({', '.join(map(str, classes[:8]))}{', ...' if len(classes) > 8 else ''}); leave model.n_classes "
                        "unset to take the shard set's count")
    for key, value in (index.get("train_defaults") or {}).items():
        if _get(out, key) is None:
            _set(out, key, value)
    for key, value in FALLBACKS.items():
        if _get(out, key) is None:
            _set(out, key, value)
    return out
