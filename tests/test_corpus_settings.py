"""What a run takes from its shard set (trainer/corpus.py): the class count, and the corpus'
settings unless the user gave them; a class count that disagrees is refused."""

from __future__ import annotations

import os

import pytest

from avbalance.errors import UserError
from tests.conftest import REPO
from trainer.config import load_config
from trainer.corpus import apply_shard_set

PRESETS = sorted(f for f in os.listdir(os.path.join(REPO, "trainer", "configs")) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_no_preset_states_a_class_count(name):
    cfg = load_config(os.path.join(REPO, "trainer", "configs", name))
    assert cfg["model"]["n_classes"] is None and cfg["data"]["frame_sampling"] is None
    resolved = apply_shard_set(cfg, {"corpus": "ave", "classes": [f"c{i}" for i in range(28)]}, "S")
    assert resolved["model"]["n_classes"] == 28 and resolved["data"]["frame_sampling"] == "consecutive"


def test_the_shard_sets_defaults_apply_unless_the_user_set_the_key():
    index = {"corpus": "ave", "classes": ["a", "b", "c"], "train_defaults": {"data.frame_sampling": "spread"}}
    assert apply_shard_set(load_config(None), index, "S")["data"]["frame_sampling"] == "spread"
    mine = load_config(None, ["data.frame_sampling=consecutive", "model.n_classes=3"])
    resolved = apply_shard_set(mine, index, "S")
    assert resolved["data"]["frame_sampling"] == "consecutive" and resolved["model"]["n_classes"] == 3
    with pytest.raises(UserError, match="one of consecutive, spread"):
        load_config(None, ["data.frame_sampling=random"])


def test_a_class_count_that_disagrees_is_refused():
    with pytest.raises(UserError, match=r"model.n_classes is 6, but the shard set S has 3 classes \(a, b, c\)"):
        apply_shard_set(load_config(None, ["model.n_classes=6"]), {"classes": ["a", "b", "c"]}, "S")


def test_older_shard_sets_without_classes():
    # CREMA-D shard sets written before `classes` was recorded: its 6 emotions
    assert apply_shard_set(load_config(None), {"corpus": "cremad"}, "S")["model"]["n_classes"] == 6
    with pytest.raises(UserError, match="does not name its classes"):
        apply_shard_set(load_config(None), {"corpus": "other"}, "S")
    assert apply_shard_set(load_config(None, ["model.n_classes=4"]), {"corpus": "other"}, "S")["model"]["n_classes"] == 4
