"""The published CREMA-D splits (ogm, vavl1..5) and our actor-disjoint k folds.

- ``ogm``: GeWu-Lab OGM-GE's random clip split (train 6,698 / test 744), MIT licence.
- ``vavl1``..``vavl5``: VAVL's speaker-independent splits of a 5,820-clip consensus subset,
  63/14/14 actors train/val/test, MIT licence. Five random splits, not disjoint folds.
- ``kfold1``..``kfoldK``: deterministic, seeded, actor-disjoint folds balanced by sex; each
  fold's validation actors are carved from its training actors.
"""

from __future__ import annotations

import csv
import functools
import io
import random
from typing import Iterable

from manifests.metadata import data_file

SPLIT_PARTS = ("train", "val", "test")
_VAVL_PART = {"Train": "train", "Development": "val", "Test": "test"}
VAVL_SPLITS = tuple(f"vavl{i}" for i in range(1, 6))


@functools.lru_cache(maxsize=1)
def ogm_split() -> dict[str, str]:
    """Clip id -> train|test, from GeWu-Lab OGM-GE's lists (no header; clip,emotion)."""
    out: dict[str, str] = {}
    for part in ("train", "test"):
        text = data_file(f"splits/ogm/{part}.csv").read_text(encoding="utf-8")
        for row in csv.reader(io.StringIO(text)):
            if row:
                out[row[0].strip()] = part
    return out


@functools.lru_cache(maxsize=5)
def vavl_split(index: int) -> dict[str, str]:
    """Clip id -> train|val|test for VAVL split ``index`` (1..5)."""
    if not 1 <= index <= 5:
        raise ValueError(f"VAVL splits are numbered 1-5, not {index}")
    text = data_file(f"splits/vavl/label_consensus_{index}.csv").read_text(encoding="utf-8")
    return {
        row["FileName"].rsplit(".", 1)[0]: _VAVL_PART[row["Split_Set"]]
        for row in csv.DictReader(io.StringIO(text))
    }


def kfold_actor_split(
    actors: Iterable[int],
    sexes: dict[int, str],
    k: int = 3,
    seed: int = 0,
    val_fraction: float = 0.15,
) -> list[dict[int, str]]:
    """Actor-disjoint k folds: for each fold, actor -> train|val|test.

    Actors are shuffled by ``seed`` within each sex and dealt round-robin into k test groups,
    so every fold's test set has a similar sex ratio. The validation actors of a fold are
    ``val_fraction`` of its remaining actors (at least one), again dealt across sexes.
    """
    actors = sorted(set(actors))
    if k < 2:
        raise ValueError("kfold needs k >= 2")
    if len(actors) < k + 2:
        raise ValueError(f"kfold with k={k} needs at least {k + 2} actors, found {len(actors)}")
    rng = random.Random(seed)
    by_sex: dict[str, list[int]] = {}
    for actor in actors:
        by_sex.setdefault(sexes.get(actor, "unknown"), []).append(actor)
    dealt: list[int] = []
    for sex in sorted(by_sex):
        group = by_sex[sex]
        rng.shuffle(group)
        dealt.extend(group)
    test_groups = [dealt[i::k] for i in range(k)]

    folds: list[dict[int, str]] = []
    for f in range(k):
        test = set(test_groups[f])
        rest = [a for a in dealt if a not in test]  # keeps the sex-interleaved order
        n_val = max(1, round(val_fraction * len(rest)))
        step = len(rest) / n_val
        val = {rest[int(i * step)] for i in range(n_val)}
        folds.append({a: "test" if a in test else "val" if a in val else "train" for a in actors})
    return folds
