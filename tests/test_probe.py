"""Linear probes: the probe itself on planted signals, its storage, and real tiny training runs
(a two-modality joint run and a visual-only control) that write probe_accuracy per modality."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from manifests.io import read_jsonl
from tests.conftest import run_cli
from trainer.config import load_config
from trainer.evaluate import evaluate_run
from trainer.loop import train
from trainer.probe import linear_probe, load_features, probe_accuracies, save_features

TINY = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
        "data.batch_size=8", "data.workers=0", "data.samples_per_epoch=16", "train.patience=0", "train.epochs=1"]


def planted(n: int, dim: int = 48, classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise features whose first ``classes`` dimensions carry the class (a linear signal)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, dim))
    x[np.arange(n), y] += 3.0
    return x, y


def test_probe_recovers_a_planted_linear_signal_and_not_shuffled_labels():
    x, y = planted(900)
    acc = linear_probe(x[:600], y[:600], x[600:], y[600:])
    assert acc > 0.85
    shuffled = np.random.default_rng(1).permutation(y[:600])
    chance = linear_probe(x[:600], shuffled, x[600:], y[600:])
    assert abs(chance - 1 / 6) < 0.08
    # the same data, the same answer (a fixed protocol)
    assert linear_probe(x[:600], y[:600], x[600:], y[600:]) == acc
    # a scaled or shifted feature space probes the same (standardised features)
    assert linear_probe(1000 * x[:600] + 5, y[:600], 1000 * x[600:] + 5, y[600:]) == pytest.approx(acc, abs=0.01)


def test_probe_edge_cases():
    x, y = planted(40)
    assert linear_probe(x[:20], np.full(20, 2), x[20:], y[20:]) == pytest.approx(np.mean(y[20:] == 2))
    assert linear_probe(x[:20], y[:20], x[:0], y[:0]) is None


def test_features_round_trip_without_pickle(tmp_path):
    x, y = planted(30, dim=8)
    parts = {"train": {"label": y, "audio": x}, "test": {"label": y[:10], "audio": x[:10], "visual": 1e5 * x[:10]}}
    path = str(tmp_path / "probe_test.npz")
    save_features(path, parts)
    got = load_features(path)
    with np.load(path, allow_pickle=False) as data:
        assert data["train/audio"].dtype == np.float16  # small values: stored as float16
        assert data["test/visual"].dtype == np.float32  # beyond float16's range: float32
    assert np.array_equal(got["train"]["label"], y)
    assert np.allclose(got["train"]["audio"], x, atol=2e-3)


def test_training_writes_probes_for_each_modality(train_shards, tmp_path):
    out = str(tmp_path / "joint")
    test = train(load_config(None, [*TINY, "balancing.name=joint"]), train_shards, out)
    with open(os.path.join(out, "eval_test.json"), encoding="utf-8") as fh:
        saved = json.load(fh)
    probes = saved["probe_accuracy"]
    assert set(probes) == {"audio", "visual"} and probes == test["probe_accuracy"]
    assert all(0.0 <= a <= 1.0 for a in probes.values())
    (record,) = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "test"]
    assert record["probe_accuracy"] == probes
    # the stored features are every clip of the train and test parts, and reproduce the accuracies
    with open(os.path.join(train_shards, "shards.json"), encoding="utf-8") as fh:
        counts = {p: v["samples"] for p, v in json.load(fh)["parts"].items()}
    feats = load_features(os.path.join(out, "probe_test.npz"))
    assert {p: len(v["label"]) for p, v in feats.items()} == {"train": counts["train"], "test": counts["test"]}
    assert feats["test"]["audio"].shape[0] == counts["test"]
    assert probe_accuracies(feats["train"], feats["test"]) == probes
    # `evaluate` computes the same probes from the same checkpoint
    again = evaluate_run(out, "test")
    assert again["probe_accuracy"] == probes


def test_visual_only_control_trains_and_mlb_refuses_it(train_shards, tmp_path):
    out = str(tmp_path / "visual_only")
    one = ["data.modalities={visual: frames}", *[t for t in TINY if "audio" not in t]]
    test = train(load_config(None, one), train_shards, out)
    assert list(test["probe_accuracy"]) == ["visual"] and list(test["unimodal_accuracy"]) == ["visual"]
    assert "agreement" not in test  # no second head to agree with
    proc = run_cli("train", "--config", "trainer/configs/resnet_mlb.yaml", "--shards", train_shards,
                   "--out", str(tmp_path / "mlb"), "--set", "data.modalities={visual: frames}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "mlb balances modalities against each other and needs at least 2 modalities" in " ".join(proc.stderr.split())
