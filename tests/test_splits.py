"""Published split lists and our k folds: counts, and no actor crossing train/val/test."""

from collections import defaultdict

import pytest

from manifests import metadata
from manifests.schema import parse_clip_name
from manifests.splits import kfold_actor_split, ogm_split, vavl_split


def parts_by_actor(table: dict[str, str]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = defaultdict(set)
    for clip, part in table.items():
        out[parse_clip_name(clip).actor].add(part)
    return out


def test_ogm_counts_match_published_lists():
    split = ogm_split()
    assert sum(p == "train" for p in split.values()) == 6698
    assert sum(p == "test" for p in split.values()) == 744
    assert set(split) == set(metadata.stimulus_numbers())  # every clip, once


@pytest.mark.parametrize("index", [1, 2, 3, 4, 5])
def test_vavl_is_speaker_independent_63_14_14(index):
    split = vavl_split(index)
    assert len(split) == 5820
    by_actor = parts_by_actor(split)
    assert all(len(parts) == 1 for parts in by_actor.values()), "an actor crosses parts"
    counts = defaultdict(int)
    for parts in by_actor.values():
        counts[next(iter(parts))] += 1
    assert dict(counts) == {"train": 63, "val": 14, "test": 14}


def test_vavl_splits_differ_from_each_other():
    assert vavl_split(1) != vavl_split(2)


def kfold_all(k=3, seed=0):
    demo = metadata.demographics()
    return kfold_actor_split(demo, {a: d["sex"] for a, d in demo.items()}, k=k, seed=seed)


def test_kfold_folds_are_actor_disjoint_and_cover_everyone_once():
    folds = kfold_all()
    assert len(folds) == 3
    tested = [a for fold in folds for a, part in fold.items() if part == "test"]
    assert sorted(tested) == list(range(1001, 1092))
    for fold in folds:
        assert set(fold.values()) == {"train", "val", "test"}
        val = [a for a, p in fold.items() if p == "val"]
        assert len(val) == round(0.15 * sum(p != "test" for p in fold.values()))


def test_kfold_is_deterministic_and_seeded():
    assert kfold_all(seed=0) == kfold_all(seed=0)
    assert kfold_all(seed=0) != kfold_all(seed=1)


def test_kfold_balances_sex_in_test_sets():
    demo = metadata.demographics()
    for fold in kfold_all():
        test = [a for a, p in fold.items() if p == "test"]
        males = sum(demo[a]["sex"] == "Male" for a in test)
        assert abs(males - 48 / 3) <= 1


def test_kfold_refuses_too_few_actors():
    with pytest.raises(ValueError, match="at least"):
        kfold_actor_split([1001, 1002, 1003], {}, k=3)
