"""Every preset in trainer/configs loads, names a registered method, and builds."""

import glob
import os

import pytest

from tests.conftest import REPO
from trainer.balancing import BALANCERS, build_balancer
from trainer.config import load_config
from trainer.run_model import check_inputs
from trainer.model import build_model

PRESETS = sorted(p for p in glob.glob(os.path.join(REPO, "trainer", "configs", "*.yaml")) if not p.endswith("_base.yaml"))


def test_both_families_have_the_core_methods():
    names = {os.path.basename(p)[:-5] for p in PRESETS}
    for family in ("resnet", "conformer"):
        assert {f"{family}_{m}" for m in ("joint", "multiloss", "mlb")} <= names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_builds(path):
    overrides = []
    if os.path.basename(path).startswith("resnet"):  # small widths for the modalities the preset has
        overrides = [f"model.encoders.{m}.width=8" for m in load_config(path)["model"]["encoders"]]
        overrides.append("model.n_classes=6")  # presets leave it to the shard set (trainer/corpus.py)
    cfg = load_config(path, overrides)
    check_inputs(cfg)
    options = dict(cfg["balancing"])
    name = options.pop("name")
    assert name in BALANCERS
    if overrides:  # the Conformer presets hold a full-size Wav2Vec2: their configs are checked only
        build_balancer(name, build_model(cfg["model"]), total_epochs=cfg["train"]["epochs"], **options)
