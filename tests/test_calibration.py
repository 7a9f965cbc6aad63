"""The calibrated synthetic corpus (docs/study.md): each modality alone is
learnable across actors by the study's model, so the study can tell methods apart.

The study's corpus (the Makefile's synth settings) and its model settings
(experiments/sweeps/study.yaml), fold kfold1, seed 0: the audio-only and the visual-only control
each clear chance (1/6) on unseen actors by a set margin, and audio is the stronger modality,
as the study needs. (A smaller corpus is not enough: with 9 actors, 5 of them training, the
face cue is not learnt across actors in the study's 10 epochs.) About 5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
CHANCE = 1 / 6


def makefile_value(name: str) -> list[str]:
    """The synth settings the Makefile gives the study (one source of truth)."""
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(f"{name} :="):
                return line.split(":=", 1)[1].split()
    raise AssertionError(f"{name} not in the Makefile")


def study_settings() -> list[str]:
    with open(os.path.join(REPO, "experiments", "sweeps", "study.yaml"), encoding="utf-8") as fh:
        return [str(s) for s in yaml.safe_load(fh)["set"]]


@pytest.fixture(scope="module")
def calibrated_shards(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("calibrated")
    synth = makefile_value("STUDY_SYNTH")
    run_cli("synth", "cremad", "--out", str(base / "corpus"), *synth, check=True)
    run_cli("preprocess", "cremad", "--root", str(base / "corpus"), "--out", str(base / "pre"), "--split", "kfold1",
            "--stages", "frames,audio,pack", "--workers", "2", check=True)
    return str(base / "pre" / "shards" / "kfold1")


def control_accuracy(shards: str, out: str, modality: str) -> float:
    sets = [s for s in study_settings() if not s.startswith(f"model.encoders.{'visual' if modality == 'audio' else 'audio'}.")]
    args = [a for s in sets for a in ("--set", s)]
    run_cli("train", "--config", os.path.join(REPO, "trainer", "configs", f"resnet_{modality}_only.yaml"),
            "--shards", shards, "--out", out, *args, check=True)
    with open(os.path.join(out, "eval_test.json"), encoding="utf-8") as fh:
        return json.load(fh)["accuracy"]


def test_each_modality_alone_is_learnable_across_actors(calibrated_shards, tmp_path):
    audio = control_accuracy(calibrated_shards, str(tmp_path / "audio"), "audio")
    visual = control_accuracy(calibrated_shards, str(tmp_path / "visual"), "visual")
    assert audio > CHANCE + 0.40, audio
    # One seed of the visual-only control varies much: the committed study's five seeds give
    # 42.3 % [28.0, 56.6]; on seed 0 with issue 27's fixes 33.7 %, and 35.4 % / 44.4 % with the
    # head init or the batch-norm statistics as before (the best-validation epoch moves). The
    # face is learnt across actors when it clears chance by 10 points on this one seed (30.9 % in
    # this test, two threads).
    assert visual > CHANCE + 0.10, visual
    assert audio > visual  # the voice is the dominant modality
