"""``train.compile``: the encoders under ``torch.compile`` train to the same results as eager.

Inductor reorders floating-point sums, so a compiled step matches an eager one to ~1e-6 and the
two runs drift apart slowly as training amplifies that; "the same results" is therefore the
first steps' losses to 1e-4 and the run's curve and accuracy within a stated tolerance. The
``eager`` backend (dynamo's tracing without code generation) must match exactly.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from tests.conftest import run_cli
from tests.test_trainer import TINY_RESNET
from trainer.config import load_config
from trainer.run_model import LossStep, build_run_model
from trainer.model import compile_encoders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "trainer", "configs")


def _batch(b: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": {"audio": {"x": torch.randn(b, 1, 64, 94, generator=g)},
                       "visual": {"x": torch.randn(b, 2, 3, 48, 48, generator=g),
                                  "mask": torch.tensor([[True, i % 2 == 0] for i in range(b)])}},
            "label": torch.randint(0, 6, (b,), generator=g)}


def test_compiled_encoders_keep_parameter_names_and_match_eager_exactly():
    cfg = load_config(os.path.join(CONFIGS, "resnet_small.yaml"), ["model.n_classes=6", "model.encoders.audio.width=8",
                                                                   "model.encoders.visual.width=8"])
    torch.manual_seed(0)
    model, balancer = build_run_model(cfg)
    compiled = copy.deepcopy(model)
    compile_encoders(compiled, backend="eager")  # dynamo's graph capture, eager kernels: bitwise equal
    assert list(compiled.state_dict()) == list(model.state_dict())  # checkpoints load either way
    for b, seed in ((6, 0), (4, 1)):  # a second batch size: the recompile path
        batch = _batch(b, seed)
        for m in (model, compiled):
            m.zero_grad()
            LossStep(m, balancer)(batch)[0].backward()
        for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
            if p.grad is None:  # joint training leaves the unimodal heads without a gradient
                assert q.grad is None, name
                continue
            assert torch.equal(p.grad, q.grad), name
    model.eval(), compiled.eval()
    with torch.no_grad():
        assert torch.equal(model(_batch(3, 2)["inputs"]).fused, compiled(_batch(3, 2)["inputs"]).fused)


def _losses(run: str) -> list[float]:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
        return [r["loss"] for r in map(json.loads, fh) if r["kind"] == "train"]


@pytest.mark.slow
def test_train_compile_gives_the_eager_runs_results(train_shards, tmp_path):
    """Two epochs of the tiny ResNet preset, eager and with ``train.compile=true`` (inductor)."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"compile_{flag}"
        run_cli("train", "--config", os.path.join(CONFIGS, "resnet_joint.yaml"), "--shards", train_shards, "--out", str(out),
                *TINY_RESNET, "--set", "train.log_every=1", "--set", "train.epochs=2", "--set", "train.patience=0",
                "--set", f"train.compile={flag}", check=True)
        runs[flag] = (_losses(str(out)), json.load(open(out / "eval_test.json")))
    (eager, eager_test), (compiled, compiled_test) = runs["false"], runs["true"]
    assert len(eager) == len(compiled) > 8
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)  # the same model, data and step
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 0.05, (eager, compiled)
    # 36 test clips: 2.8 points each; the runs drift apart by rounding, not by what they learn
    assert abs(compiled_test["accuracy"] - eager_test["accuracy"]) <= 3 / 36 + 1e-9, (eager_test, compiled_test)
