"""The stage contract: a name, a version, a config dataclass, and a cache key per clip.

A stage's output for a clip is cached under a key made of (stage name, stage version, its
config, the key of its input). Changing one stage's config changes its key and the keys of
the stages that consume its output, so exactly those are redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar

from avbalance.registry import Registry


def stable_hash(*parts: Any) -> str:
    """sha256 of a JSON rendering of ``parts`` (dataclasses as dicts, sorted keys)."""
    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.asdict(x)
        return x

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Stage:
    """Base class: subclasses set ``name``, ``version``, ``inputs`` and a ``Config`` dataclass."""

    name: ClassVar[str]
    version: ClassVar[int]
    inputs: ClassVar[tuple[str, ...]]  # upstream stage names or "video"/"audio_source"

    def __init__(self, config: Any) -> None:
        self.config = config

    def key(self, input_keys: dict[str, str]) -> str:
        return stable_hash(self.name, self.version, self.config, [input_keys[i] for i in self.inputs])


STAGES: Registry[type[Stage]] = Registry("stage")
