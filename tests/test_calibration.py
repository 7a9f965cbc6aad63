"""The calibrated synthetic corpora (docs/calibration.md): each modality alone is learnable
across actors by the study's model, so the study can tell methods apart.

Each setting's corpus (the Makefile's synth settings) and the study's model settings
(experiments/sweeps/study.yaml), fold kfold1, seed 0:

- imbalanced: the audio-only and the visual-only control each clear chance (1/6) on unseen
  actors by a set margin, and audio is the stronger modality;
- complementary: both controls clear chance, and the unimodal ensemble of the two (the mean of
  their softmax outputs) beats the better control: the modalities complement each other.

(A smaller corpus is not enough: with 9 actors, 5 of them training, the face cue is not learnt
across actors in the study's 10 epochs.) About 5 minutes per setting on 2 cores.
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


def calibrated_shards(base, setting: str) -> str:
    synth = makefile_value(f"STUDY_SYNTH_{setting}")
    run_cli("synth", "cremad", "--out", str(base / "corpus"), *synth, check=True)
    run_cli("preprocess", "cremad", "--root", str(base / "corpus"), "--out", str(base / "pre"), "--split", "kfold1",
            "--stages", "frames,audio,pack", "--workers", "2", check=True)
    return str(base / "pre" / "shards" / "kfold1")


def control(shards: str, out: str, modality: str) -> str:
    """The control's run folder, trained with the study's settings."""
    sets = [s for s in study_settings() if not s.startswith(f"model.encoders.{'visual' if modality == 'audio' else 'audio'}.")]
    args = [a for s in sets for a in ("--set", s)]
    run_cli("train", "--config", os.path.join(REPO, "trainer", "configs", f"resnet_{modality}_only.yaml"),
            "--shards", shards, "--out", out, *args, check=True)
    return out


def accuracy(run: str) -> float:
    with open(os.path.join(run, "eval_test.json"), encoding="utf-8") as fh:
        return json.load(fh)["accuracy"]


def test_imbalanced_each_modality_alone_is_learnable_across_actors(tmp_path):
    shards = calibrated_shards(tmp_path, "imbalanced")
    audio = accuracy(control(shards, str(tmp_path / "audio"), "audio"))
    visual = accuracy(control(shards, str(tmp_path / "visual"), "visual"))
    assert audio > CHANCE + 0.40, audio
    # One seed of the visual-only control varies much: before issue 27's fixes the study's five
    # seeds gave 42.3 % [28.0, 56.6], with them 32.3 % [26.3, 38.3] (the imbalanced rows of
    # docs/results/study/summary.json); on seed 0 33.7 %, and 35.4 % / 44.4 % with the head init
    # or the batch-norm statistics as before (the best-validation epoch moves). The face is learnt
    # across actors when it clears chance by 10 points on this one seed (30.9 % in this test, two
    # threads).
    assert visual > CHANCE + 0.10, visual
    assert audio > visual  # the voice is the dominant modality


def test_complementary_both_learnable_and_their_ensemble_beats_either(tmp_path):
    from experiments.ensemble import ensemble_scores
    from trainer.predictions import load_predictions

    shards = calibrated_shards(tmp_path, "complementary")
    runs = {m: control(shards, str(tmp_path / m), m) for m in ("audio", "visual")}
    accuracies = {m: accuracy(run) for m, run in runs.items()}
    # Both modalities carry the emotion on unseen actors, far above chance.
    assert min(accuracies.values()) > CHANCE + 0.20, accuracies
    # Their ensemble (the mean of the two controls' softmax outputs) beats the better one: each
    # modality gets clips right that the other misses. Five seeds gave +11.3 points [+6.6, +16.0]
    # when the setting was chosen (docs/calibration.md, F); seed 0 alone must clear 3 points.
    members = [load_predictions(os.path.join(run, "logits_test.npz")) for run in runs.values()]
    ensemble = ensemble_scores(members)["accuracy"]
    assert ensemble > max(accuracies.values()) + 0.03, (ensemble, accuracies)
