"""Find run folders under a directory and read each one: its config, its metrics log, its
test evaluation (absent while unfinished), and the human raters' accuracy on its test clips."""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

import yaml

from avbalance.errors import UserError
from avbalance.invocation import prog

RUN_FILES = ("config.yaml", "metrics.jsonl")
PRESENTATIONS = ("voice", "face", "audiovisual")  # CREMA-D crowd ratings, per presentation
SPLIT_KINDS = re.compile(r"^(ogm|kfold|vavl)\d*$")


@dataclass
class Run:
    """One training run folder, read."""

    path: str  # absolute folder
    id: str
    preset: str  # preset family: resnet, conformer, ...
    method: str
    fusion: str
    split: str  # shard-set name: ogm, kfold1, vavl3, ...
    seed: int
    block: str  # the sweep block ("" outside a sweep)
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(repr=False)
    test: dict[str, Any] | None = field(repr=False)  # eval_<test part>.json; None: unfinished

    @property
    def finished(self) -> bool:
        return self.test is not None

    @property
    def status(self) -> str:
        return "finished" if self.finished else "unfinished"

    @property
    def split_kind(self) -> str:
        """ogm, kfold (kfold1..K) or vavl (vavl1..5); another split's own name."""
        match = SPLIT_KINDS.match(self.split)
        return match.group(1) if match else self.split

    @property
    def setting(self) -> str:
        """What results are aggregated over (folds and seeds): sweep block, preset family, split kind
        (the last two left out of the label when the block's name holds them, as in resnet_ogm)."""
        return " · ".join([self.block] * bool(self.block) + [x for x in (self.preset, self.split_kind) if x not in self.block])

    @property
    def modalities(self) -> list[str]:
        return list(self.config.get("data", {}).get("modalities") or self.config.get("model", {}).get("encoders") or {})

    @property
    def shards(self) -> str | None:
        return self.config.get("data", {}).get("shards")

    @property
    def test_part(self) -> str:
        return self.config.get("data", {}).get("test_part", "test")

    def kind(self, kind: str) -> list[dict[str, Any]]:
        """The metrics records of one kind (train, val, test), in log order."""
        return [r for r in self.records if r.get("kind") == kind]

    @property
    def epochs(self) -> int:
        """Validated epochs."""
        return len({r.get("epoch") for r in self.kind("val")})


def find_runs(root: str) -> list[str]:
    """Every folder under ``root`` (itself included) holding config.yaml and metrics.jsonl, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        if all(name in files for name in RUN_FILES):
            found.append(os.path.abspath(folder))
            dirs[:] = []  # a run folder holds no other run
        else:
            dirs.sort()
    return sorted(found)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line cut short by a kill is skipped."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def preset_family(config: dict[str, Any]) -> str:
    """The text of ``name`` before the first ``_`` (resnet_mlb -> resnet); else from the encoders."""
    name = str(config.get("name") or "")
    if "_" in name:
        return name.split("_", 1)[0]
    encoders = sorted(str(e.get("name", "")) for e in (config.get("model", {}).get("encoders") or {}).values())
    if encoders and all(e.startswith("resnet") for e in encoders):
        return "resnet"
    if encoders and all(e.endswith("conformer") for e in encoders):
        return "conformer"
    return "+".join(encoders) or name or "unknown"


def method_label(config: dict[str, Any]) -> str:
    """The balancing method's name; a one-modality model is its unimodal control, ``<m>_only``."""
    modalities = list(config.get("data", {}).get("modalities") or config.get("model", {}).get("encoders") or {})
    if len(modalities) == 1:
        return f"{modalities[0]}_only"
    return str(config.get("balancing", {}).get("name", "unknown"))


def read_run(folder: str, root: str) -> Run:
    """Read one run folder; ``sweep_run.json`` (when present) names it, else its config does."""
    folder = os.path.abspath(folder)
    with open(os.path.join(folder, "config.yaml"), encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    if not isinstance(config, dict):
        raise UserError(f"{folder}/config.yaml is not a mapping: not a run folder")
    sweep = _read_json(os.path.join(folder, "sweep_run.json")) or {}
    rel = os.path.relpath(folder, os.path.abspath(root))
    test_part = config.get("data", {}).get("test_part", "test")
    shards = config.get("data", {}).get("shards") or ""
    return Run(
        path=folder,
        id=str(sweep.get("id") or (os.path.basename(folder) if rel == "." else rel.replace(os.sep, "/"))),
        preset=str(sweep.get("preset") or preset_family(config)),
        method=str(sweep.get("method") or method_label(config)),
        fusion=str(sweep.get("fusion") or config.get("model", {}).get("fusion", {}).get("name", "unknown")),
        split=str(sweep.get("split") or os.path.basename(os.path.normpath(shards)) or "unknown"),
        seed=int(sweep.get("seed", config.get("seed", 0))),
        block=str(sweep.get("block") or ""),
        config=config,
        records=read_jsonl(os.path.join(folder, "metrics.jsonl")),
        test=_read_json(os.path.join(folder, f"eval_{test_part}.json")),
    )


def collect_runs(root: str) -> list[Run]:
    """Every run under ``root``; a UserError when there is none."""
    if not os.path.isdir(root):
        raise UserError(f"--runs {root}: no such folder")
    runs = [read_run(folder, root) for folder in find_runs(root)]
    if not runs:
        raise UserError(f"no runs under {root}: a run folder holds config.yaml and metrics.jsonl "
                        f"(written by `{prog()} train`)")
    return runs


def data_info(shards: str | None) -> dict[str, Any] | None:
    """What a shard set was made from, from its ``shards.json``: ``corpus``; ``synthetic``
    (the index's own flag when it has one, else whether the corpus folder it was made from holds
    the ``synth.json`` that ``cli.py synth`` writes; None when that folder is gone); ``synth``
    (the synth settings); ``face_weights_random`` (face features from random weights; None
    without face features). None when the shard set cannot be read."""
    index = _read_json(os.path.join(shards, "shards.json")) if shards else None
    if index is None:
        return None
    root = (index.get("config") or {}).get("root")
    synth = _read_json(os.path.join(root, "synth.json")) if root else None
    if "synthetic" in index:
        synthetic = bool(index["synthetic"])
    else:
        synthetic = True if synth else (False if root and os.path.isdir(root) else None)
    weights = index.get("face_weights")
    return {"corpus": index.get("corpus"), "synthetic": synthetic, "synth": (synth or {}).get("config"),
            "face_weights_random": bool(weights.get("random_init")) if isinstance(weights, dict) else None}


_HUMAN_CACHE: dict[tuple[str, str, float], dict[str, Any] | None] = {}


def human_accuracy(shards: str | None, part: str = "test") -> dict[str, Any] | None:
    """The crowd raters' accuracy per presentation (voice, face, audiovisual) on the clips of one
    part of a shard set: ``{"clips": n, "voice": acc|None, ..., "rated": {presentation: n}}``.

    A clip counts for a presentation when its ``.json`` member has ``votes[presentation].correct``.
    None when the shards cannot be read (moved or deleted). Cached per shard folder and part.
    """
    from trainer.shard_index import shard_urls

    if not shards:
        return None
    index = os.path.join(shards, "shards.json")
    try:
        key = (os.path.realpath(shards), part, os.path.getmtime(index))
    except OSError:
        return None
    if key not in _HUMAN_CACHE:
        try:
            urls, _ = shard_urls(shards, part)
            _HUMAN_CACHE[key] = _count_votes(urls)
        except (UserError, OSError, KeyError, ValueError, tarfile.TarError):
            _HUMAN_CACHE[key] = None
    return _HUMAN_CACHE[key]


def _count_votes(urls: list[str]) -> dict[str, Any]:
    clips, rated, right = 0, dict.fromkeys(PRESENTATIONS, 0), dict.fromkeys(PRESENTATIONS, 0)
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".json")):
                    continue
                clips += 1
                meta = json.loads(tar.extractfile(member).read())
                votes = meta.get("votes") or {}
                for p in PRESENTATIONS:
                    correct = (votes.get(p) or {}).get("correct")
                    if isinstance(correct, bool):
                        rated[p] += 1
                        right[p] += int(correct)
    out: dict[str, Any] = {"clips": clips, "rated": rated}
    out.update({p: (right[p] / rated[p] if rated[p] else None) for p in PRESENTATIONS})
    return out
