"""`cli.py train` / `evaluate` on synthetic shards: above-chance learning for both preset
families, resume equivalence, a 2-process DDP run, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from manifests.io import read_jsonl
from tests.conftest import REPO, run_cli

CONFIGS = os.path.join(REPO, "trainer", "configs")
TINY_RESNET = ["--set", "model.encoders.audio.width=8", "--set", "model.encoders.visual.width=8",
               "--set", "data.image_size=48", "--set", "data.frames=2", "--set", "data.batch_size=8",
               "--set", "data.workers=1", "--set", "train.log_every=2"]
TINY_CONFORMER = [
    "--set", "model.encoders.audio={name: wav2vec2_conformer, hidden_size: 32, num_layers: 2, num_heads: 2, "
    "intermediate_size: 64, keep_layers: 2, d_model: 32, n_blocks: 1, n_heads: 2, conv_kernel: 7, "
    "cnn_dim: [32, 32, 32, 32], cnn_kernel: [10, 4, 4, 4], cnn_stride: [5, 4, 4, 4], pos_conv_kernel: 16, pos_conv_groups: 4}",
    "--set", "model.encoders.visual={name: face_conformer, d_model: 32, n_blocks: 1, n_heads: 2, conv_kernel: 7}",
    "--set", "data.batch_size=8", "--set", "data.workers=1", "--set", "data.max_wav_seconds=3.0",
    "--set", "optim.lr=2e-3", "--set", "train.log_every=4", "--set", "data.samples_per_epoch=96",
]


@pytest.fixture
def shards(train_shards) -> str:
    return train_shards


def train(shards: str, out: str, config: str, *extra: str, check: bool = True):
    return run_cli("train", "--config", os.path.join(CONFIGS, config), "--shards", shards, "--out", out, *extra, check=check)


def test_resnet_preset_learns_above_chance(shards, tmp_path):
    proc = train(shards, str(tmp_path / "run"), "resnet_mlb.yaml", *TINY_RESNET, "--set", "train.epochs=12")
    metrics = json.load(open(tmp_path / "run" / "eval_test.json"))
    assert metrics["accuracy"] >= 0.35, proc.stdout  # chance is 1/6; 36 test clips: P(>= 13 right by chance) < 0.5 %
    log = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    steps = [r for r in log if r["kind"] == "train"]
    assert all({"k/audio", "k/visual", "r/audio", "r/visual", "lr", "samples_per_s"} <= set(r) for r in steps)


@pytest.mark.slow  # the fast suite trains the ResNet preset to the same bar
def test_conformer_preset_learns_above_chance(shards, tmp_path):
    proc = train(shards, str(tmp_path / "run"), "conformer_multiloss.yaml", *TINY_CONFORMER, "--set", "train.epochs=12")
    metrics = json.load(open(tmp_path / "run" / "eval_test.json"))
    # chance is 1/6; P(>= 11 of 36 right by chance) ~ 3 %. The face branch is weak here: the test
    # shards use a random-init EfficientNet, whose features carry little of the face cue.
    assert metrics["accuracy"] >= 0.3, proc.stdout


def test_resume_gives_the_same_result_as_an_uninterrupted_run(shards, tmp_path):
    common = [*TINY_RESNET, "--set", "train.patience=0"]
    train(shards, str(tmp_path / "full"), "resnet_mlb.yaml", *common, "--set", "train.epochs=2")
    train(shards, str(tmp_path / "cut"), "resnet_mlb.yaml", *common, "--set", "train.epochs=1")
    train(shards, str(tmp_path / "cut"), "resnet_mlb.yaml", *common, "--set", "train.epochs=2", "--resume")
    full = json.load(open(tmp_path / "full" / "eval_test.json"))
    resumed = json.load(open(tmp_path / "cut" / "eval_test.json"))
    assert resumed["confusion"] == full["confusion"]
    assert resumed["accuracy"] == full["accuracy"] and resumed["ece"] == pytest.approx(full["ece"], abs=1e-6)
    last = lambda p: [r for r in read_jsonl(str(p / "metrics.jsonl")) if r["kind"] == "train"][-1]  # noqa: E731
    assert last(tmp_path / "cut")["loss"] == pytest.approx(last(tmp_path / "full")["loss"], rel=1e-5)


def test_evaluate_writes_every_metric(shards, tmp_path):
    train(shards, str(tmp_path / "run"), "resnet_joint.yaml", *TINY_RESNET, "--set", "train.epochs=1")
    trained = json.load(open(tmp_path / "run" / "eval_test.json"))
    os.remove(tmp_path / "run" / "eval_test.json")
    proc = run_cli("evaluate", "--run", str(tmp_path / "run"), "--split", "test", check=True)
    assert "accuracy" in proc.stdout
    m = json.load(open(tmp_path / "run" / "eval_test.json"))
    assert m["accuracy"] == trained["accuracy"]
    # the checkpoint on its own train part in evaluation mode: the same pass as train's probe
    assert m["train_accuracy"] == trained["train_accuracy"] and 0 <= m["train_accuracy"] <= 1
    index = json.load(open(os.path.join(shards, "shards.json")))
    assert m["samples"] == index["parts"]["test"]["samples"]
    assert len(m["confusion"]) == 6 and len(m["reliability"]) == 15
    assert set(m["agreement"]) == {"both_right", "only_audio", "only_visual", "both_wrong"}
    assert set(m["unimodal_accuracy"]) == {"audio", "visual"} and 0 <= m["ece"] <= 1


@pytest.mark.slow  # the fast suite runs torchrun once: tests/test_every_method.py (joint)
def test_two_process_ddp_run(shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(REPO, "cli.py"), "train", "--config", os.path.join(CONFIGS, "resnet_mlb.yaml"),
           "--shards", shards, "--out", str(out), *TINY_RESNET, "--set", "train.epochs=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train: test accuracy") == 1  # only rank 0 reports
    m = json.load(open(out / "eval_test.json"))
    index = json.load(open(os.path.join(shards, "shards.json")))
    assert m["samples"] == index["parts"]["test"]["samples"]  # every test clip, once, across ranks
    steps = [r for r in read_jsonl(str(out / "metrics.jsonl")) if r["kind"] == "train"]
    assert len({r["step"] for r in steps}) == len(steps)  # one writer


@pytest.mark.parametrize("extra, message", [
    (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--set", "train.epochs=many"], "expects int"),
    (["--set", "balancing.name=nope"], "unknown balancing method"),
    (["--set", "data.modalities={audio: wav, visual: frames}"], "encoder resnet18_audio reads 'spec'"),
    (["--set", "data.modalities.face=face_feats"], "must name the same modalities"),
])
def test_bad_config_is_refused_clearly(shards, tmp_path, extra, message):
    proc = train(shards, str(tmp_path / "run"), "resnet_joint.yaml", *TINY_RESNET, *extra, check=False)
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_shards_are_refused_clearly(shards, tmp_path):
    proc = train(str(tmp_path / "nowhere"), str(tmp_path / "run"), "resnet_joint.yaml", check=False)
    assert proc.returncode == 2 and "shards.json" in proc.stderr and "Traceback" not in proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    os.remove(next(p for p in broken.iterdir() if p.name.startswith("train-")))
    proc = train(str(broken), str(tmp_path / "run2"), "resnet_joint.yaml", check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_loader_batches_are_padded_and_ranks_get_equal_disjoint_work(shards):
    from trainer.data_config import DataConfig
    from trainer.loader import make_loader

    cfg = DataConfig(modalities={"audio": "wav", "visual": "face_feats", "frames": "frames"}, batch_size=4, workers=2, image_size=32)
    per_rank = []
    for rank in (0, 1):
        loader, n = make_loader(shards, "train", cfg, train=True, rank=rank, world_size=2, seed=3)
        batches = list(loader)
        assert len(batches) == n  # the same count on every rank, whatever the shard sizes
        per_rank.append({c for b in batches for c in b["clip_id"]})
        b = batches[0]
        wav, face = b["inputs"]["audio"], b["inputs"]["visual"]
        assert wav["x"].shape[0] == 4 and wav["mask"].shape == wav["x"].shape
        lengths = wav["mask"].sum(1)
        assert (wav["x"][0, lengths[0]:] == 0).all() and lengths.max() == wav["x"].shape[1]
        assert face["x"].shape[:2] == face["mask"].shape and face["x"].shape[2] == 1408
        assert b["inputs"]["frames"]["x"].shape == (4, 3, 3, 32, 32)
    assert not per_rank[0] & per_rank[1]  # ranks read different shards
    evaluation, _ = make_loader(shards, "test", cfg, train=False)
    seen = [c for b in evaluation for c in b["clip_id"]]
    index = json.load(open(os.path.join(shards, "shards.json")))
    assert len(seen) == len(set(seen)) == index["parts"]["test"]["samples"]


def test_a_retired_key_of_an_older_run_is_read_and_dropped():
    """An older version wrote ``data.eval_batch_size`` (never read) into every run's
    config.yaml: such a config still loads (so the run resumes and reports), without it."""
    from avbalance.errors import UserError
    from trainer.config import DEFAULTS, merge

    old_run = {"data": {"batch_size": 8, "eval_batch_size": 32}, "train": {"epochs": 2}}
    cfg = merge(DEFAULTS, old_run)
    assert cfg["data"]["batch_size"] == 8 and "eval_batch_size" not in cfg["data"]
    with pytest.raises(UserError, match="unknown config key 'data.eval_batch_sizes'"):
        merge(DEFAULTS, {"data": {"eval_batch_sizes": 32}})
