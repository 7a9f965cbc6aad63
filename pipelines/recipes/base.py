"""The recipe contract: one class per corpus, registered by name (lhotse style).

A recipe turns a corpus as distributed into a manifest in the generic schema
(``manifests/record.py``); everything after that — decode, stages, pack, the trainer — reads
the manifest only, never the corpus' layout. docs/recipes.md explains how to add one.

    @RECIPES.register("mycorpus")      # also sets MyCorpus.name
    class MyCorpus(Recipe):
        ...
        def prepare(self, root, out): ...  # writes clips.jsonl, skipped.jsonl, summary.json

``cli.py manifest NAME`` and ``cli.py preprocess NAME`` get the recipe's own options from
``add_arguments`` and build it with ``from_args``.
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

from avbalance.registry import Registry


class _DestRecorder(argparse.ArgumentParser):
    """A parser that records the ``dest`` of every option added to it (``from_args``)."""

    def __init__(self) -> None:
        super().__init__(add_help=False)
        self.dests: list[str] = []

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)
        self.dests.append(action.dest)
        return action


class Recipe:
    """One corpus. Subclasses set the class attributes and implement ``prepare``."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for ``--help``
    root_help: ClassVar[str]  # what --root must hold
    default_split: ClassVar[str]  # what ``preprocess --split`` packs by default
    clip_seconds: ClassVar[float | None] = None  # nominal clip length (shards.json; None: varies)
    spec_seconds: ClassVar[float] = 3.0  # what the spectrogram covers (clips tiled or cut to it)
    # What ``preprocess --stages`` runs by default: the modalities this corpus has.
    default_stages: ClassVar[tuple[str, ...]] = ("frames", "faces", "face_features", "audio", "pack")
    # Trainer settings this corpus needs on top of a preset (docs/recipes.md says why), e.g.
    # {"data.frames": 3}; written to shards.json, applied unless the user sets the key.
    train_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        self.options = options

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this corpus' own options (every help text states its default)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Recipe":
        """Build from parsed arguments: every option ``add_arguments`` added, by its dest."""
        probe = _DestRecorder()
        cls.add_arguments(probe)
        return cls(**{dest: getattr(args, dest) for dest in probe.dests if hasattr(args, dest)})

    def prepare(self, root: str, out: str) -> dict:
        """Scan ``root``, write the manifest to ``out`` (``manifests.io.write_manifest``) and
        return its summary. Raise ``UserError`` when nothing usable is there; record every
        file or list entry that cannot be used in ``skipped`` with its reason."""
        raise NotImplementedError

    def named_clips(self, split: str, clips: list[dict], skipped: list[dict]) -> dict[str, str]:
        """Clip id -> part for every clip the split names, including clips that are missing or
        unusable (a skipped entry with ``clip_id`` and ``splits``): the coverage table counts
        them. Recipes with published lists override this to read them."""
        named = {c["clip_id"]: c["splits"][split] for c in clips if split in c["splits"]}
        for s in skipped:
            if s.get("clip_id") and split in s.get("splits", {}):
                named.setdefault(s["clip_id"], s["splits"][split])
        return named

    def sample_meta(self, clip: dict) -> dict:
        """The fields of a manifest record that go into each shard sample's ``json``."""
        keep = ("clip_id", "label", "label_name", "group", "start", "end", "meta")
        return {k: clip[k] for k in keep if k in clip}


RECIPES: Registry[type[Recipe]] = Registry("corpus recipe")
