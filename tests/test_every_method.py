"""Every registered balancing method, in both preset families, works with every command:
trained for one epoch, a run evaluated after the fact through ``cli.py evaluate`` gives the
numbers training recorded (methods may change the model, e.g. MMCosine swaps the head), and
under a 2-process torchrun (gloo on CPU) every method trains with one process's semantics.

The method list comes from the registry, so a method added later is covered automatically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from manifests.io import read_jsonl
from tests.conftest import REPO
from trainer.balancing import BALANCERS

CONFIGS = os.path.join(REPO, "trainer", "configs")
QUICK = ["data.batch_size=8", "data.workers=0", "data.samples_per_epoch=8", "train.epochs=1", "train.patience=0",
         "train.log_every=1"]
FAMILIES = {
    "resnet": ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1"],
    "conformer": [
        "model.encoders.audio={name: wav2vec2_conformer, hidden_size: 16, num_layers: 1, num_heads: 2, "
        "intermediate_size: 32, keep_layers: 1, d_model: 16, n_blocks: 1, n_heads: 2, conv_kernel: 7, "
        "cnn_dim: [16, 16, 16, 16], cnn_kernel: [10, 4, 4, 4], cnn_stride: [5, 4, 4, 4], pos_conv_kernel: 16, pos_conv_groups: 4}",
        "model.encoders.visual={name: face_conformer, d_model: 16, n_blocks: 1, n_heads: 2, conv_kernel: 7}",
        "data.max_wav_seconds=2.0",
    ],
}
# Options that make a method act inside a 1-epoch run (re-learning re-initialises at epoch 0 then).
ACTIVE = {"relearning": ["balancing.every=1"]}
CASES = [(m, f) for f in FAMILIES for m in BALANCERS.names()]


def overrides(method: str, family: str) -> list[str]:
    return [*FAMILIES[family], *QUICK, *ACTIVE.get(method, [])]


def preset(method: str, family: str) -> str:
    return os.path.join(CONFIGS, f"{family}_{method}.yaml")


def assert_same_numbers(after: dict, recorded: dict) -> None:
    """The numbers an after-the-fact evaluation gives equal those the training run recorded."""
    assert after["samples"] == recorded["samples"]
    assert after["confusion"] == recorded["confusion"]
    assert after["accuracy"] == recorded["accuracy"] and after["macro_f1"] == pytest.approx(recorded["macro_f1"], abs=1e-9)
    assert after["unimodal_accuracy"] == recorded["unimodal_accuracy"]
    assert after["ece"] == pytest.approx(recorded["ece"], abs=1e-5)


def evaluate_through_cli(run: str) -> dict:
    """``cli.py evaluate --run RUN`` (the CLI's own entry point); the eval_test.json it writes."""
    import cli

    recorded = os.path.join(run, "eval_test.json")
    os.replace(recorded, recorded + ".trained")
    assert cli.main(["evaluate", "--run", run, "--split", "test"]) == 0
    with open(recorded, encoding="utf-8") as fh:
        return json.load(fh)


# The fast suite runs joint and MLB, and the head-swapping method (MMCosine) in both families;
# every other method x family runs in the slow suite (CI), as does the whole matrix under
# torchrun, which evaluates every run after the fact too.
FAST = {("joint", "resnet"), ("mlb", "resnet"), ("mmcosine", "resnet"), ("mmcosine", "conformer")}
EVAL_CASES = [pytest.param(m, f, id=f"{f}_{m}", marks=() if (m, f) in FAST else pytest.mark.slow)
              for m, f in CASES]


@pytest.mark.parametrize("method, family", EVAL_CASES)
def test_a_trained_run_evaluates_to_the_recorded_numbers(train_shards, tmp_path, method, family):
    from trainer.config import load_config
    from trainer.loop import train

    out = str(tmp_path / "run")
    train(load_config(preset(method, family), overrides(method, family)), train_shards, out)
    with open(os.path.join(out, "eval_test.json"), encoding="utf-8") as fh:
        recorded = json.load(fh)
    assert_same_numbers(evaluate_through_cli(out), recorded)


def test_a_sweep_run_evaluates_to_what_the_sweep_and_the_report_recorded(train_shards, tmp_path):
    """The sweep and report paths: sweep.json's accuracy, the report's reading of the run, and
    an after-the-fact ``evaluate`` agree (MMCosine: a method that changes the model)."""
    import yaml

    from experiments.collect import collect_runs
    from experiments.sweep import load_sweep, run_sweep

    doc = {"out": str(tmp_path / "runs"), "shards": os.path.join(os.path.dirname(train_shards), "{split}"),
           "set": [*FAMILIES["resnet"], *QUICK],
           "blocks": [{"name": "t", "preset": "resnet", "splits": [os.path.basename(train_shards)], "seeds": [0],
                       "methods": ["mmcosine"], "fusions": ["late_linear"]}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    run_sweep(load_sweep(str(tmp_path / "sweep.yaml")), report=lambda line: None)
    with open(tmp_path / "runs" / "sweep.json", encoding="utf-8") as fh:
        (record,) = json.load(fh)["runs"]
    assert record["status"] == "done", record
    (run,) = collect_runs(str(tmp_path / "runs"))
    assert run.method == "mmcosine" and run.test["accuracy"] == record["accuracy"]
    after = evaluate_through_cli(str(tmp_path / "runs" / record["folder"]))
    assert_same_numbers(after, run.test)


def torchrun_command(shards: str, out: str, method: str, family: str, launch: list[str]) -> list[str]:
    """``torchrun LAUNCH cli.py train`` for a 2-epoch run of ``method`` (launch: torchrun's own options)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch,
           os.path.join(REPO, "cli.py"), "train", "--config", preset(method, family), "--shards", shards, "--out", out]
    for item in [*overrides(method, family), "train.epochs=2"]:
        cmd += ["--set", item]
    return cmd


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "AVBALANCE_QUIET": "1"}


def torchrun_train(shards: str, out: str, method: str, family: str, port: int) -> subprocess.CompletedProcess:
    cmd = torchrun_command(shards, out, method, family, ["--nproc_per_node", "2", "--master_port", str(port)])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900, env=TORCHRUN_ENV)


def check_ddp_run(shards: str, out: str, proc: subprocess.CompletedProcess) -> dict:
    """A 2-process run finished once, tested every clip once, logged from one writer, and
    evaluates after the fact to what it recorded."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Expected to have finished reduction" not in proc.stderr
    assert proc.stdout.count("train: test accuracy") == 1  # only rank 0 reports
    with open(os.path.join(out, "eval_test.json"), encoding="utf-8") as fh:
        recorded = json.load(fh)
    with open(os.path.join(shards, "shards.json"), encoding="utf-8") as fh:
        assert recorded["samples"] == json.load(fh)["parts"]["test"]["samples"]
    steps = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"]
    assert {r["epoch"] for r in steps} == {0, 1} and len({r["step"] for r in steps}) == len(steps)
    assert_same_numbers(evaluate_through_cli(out), recorded)
    return recorded


def test_joint_under_torchrun_leaves_unused_heads_untouched(train_shards, tmp_path):
    """The fast case: joint (every comparison's baseline) crashed on its second DDP step.
    As in one process, the unimodal heads it gives no loss keep their initial weights."""
    from trainer.config import load_config
    from trainer.run_model import build_run_model
    from trainer.seeding import seed_everything

    out = str(tmp_path / "ddp")
    check_ddp_run(train_shards, out, torchrun_train(train_shards, out, "joint", "resnet", 29541))
    # The class count the run took from shards.json (presets leave it to the shard set).
    cfg = load_config(preset("joint", "resnet"), [*overrides("joint", "resnet"), "model.n_classes=6"])
    seed_everything(cfg["seed"], deterministic=False)  # rank 0's initial weights, which DDP broadcasts
    initial, _ = build_run_model(cfg)
    trained = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["model"]
    for key, value in initial.state_dict().items():
        if key.startswith("heads."):
            assert torch.equal(trained[key], value), key
    assert any(not torch.equal(trained[k], v) for k, v in initial.state_dict().items() if k.startswith("encoders."))


@pytest.mark.slow
@pytest.mark.parametrize("method, family", CASES, ids=[f"{f}_{m}" for m, f in CASES])
def test_every_method_trains_under_torchrun(train_shards, tmp_path, method, family):
    out = str(tmp_path / "ddp")
    port = 29600 + CASES.index((method, family))
    check_ddp_run(train_shards, out, torchrun_train(train_shards, out, method, family, port))
