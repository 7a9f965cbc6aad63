"""Every registered balancing method through the real loop on synthetic shards: a short
run without NaN, then a resumed run that restores the method's state."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from manifests.io import read_jsonl
from trainer.balancing import BALANCERS
from trainer.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.loop import train

STATEFUL = {"mlb", "ogm_ge", "agm", "mslr", "pmr", "cggm", "miles", "relearning"}
# Options that make a method act inside a short run: re-learning re-initialises after (0-based)
# epoch E > 0 with E % every == 0, as its reference, so at the start of epoch 2 of a 3-epoch run.
ACTIVE = {"relearning": ["balancing.every=1"]}
EPOCHS = {"relearning": 3}
TINY = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
        "data.batch_size=8", "data.workers=0", "data.samples_per_epoch=16", "train.log_every=1", "train.patience=0"]


# joint, MLB and re-learning (whose state and epoch-start pass are the hardest to resume) in the
# fast suite; every other registered method in the slow suite (CI).
FAST = {"joint", "mlb", "relearning"}


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m in FAST else pytest.mark.slow) for m in BALANCERS.names()])
def test_method_trains_and_resumes(train_shards, tmp_path, method):
    out = str(tmp_path / "run")
    extra = ACTIVE.get(method, [])
    first = load_config(None, [*TINY, f"balancing.name={method}", *extra, "train.epochs=1"])
    train(first, train_shards, out)
    saved = load_checkpoint(os.path.join(out, "last.pt"))["balancer"]
    epochs = EPOCHS.get(method, 2)
    second = load_config(None, [*TINY, f"balancing.name={method}", *extra, f"train.epochs={epochs}"])
    test = train(second, train_shards, out, resume=True)
    assert 0.0 <= test["accuracy"] <= 1.0
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["epoch"] for r in steps] == [e for e in range(epochs) for _ in range(2)]  # resumed from epoch 1
    for r in steps:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    # Stateful methods saved their state after epoch 0; the resumed run loaded it (a
    # mismatch raises in load_state_dict) and saved its own after epoch 1.
    if method in STATEFUL:
        assert _plain(saved), f"{method} saved no state"
    final = load_checkpoint(os.path.join(out, "last.pt"))
    assert final["state"]["epoch"] == epochs
    if method in STATEFUL:
        assert json.dumps(_plain(final["balancer"]), sort_keys=True) != "{}"
    if method == "relearning":  # the resumed run diagnosed and re-initialised once, at epoch 2
        assert final["balancer"]["reinits"] == 1
        assert any("alpha/audio" in r for r in steps if r["epoch"] == 2)


def _plain(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
