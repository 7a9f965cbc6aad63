"""Nothing in the trainer assumes the modality names "audio" and "visual": every balancing
method trains, logs and evaluates with modalities named otherwise (voice, face) — UCF-101's
RGB + flow and any user's corpus have no "audio" or "visual". MLB and MSLR (whose
reference scales were keyed by name) run in the fast suite, every method x family in the
slow one. The method list comes from the registry."""

from __future__ import annotations

import json
import os

import pytest

from manifests.io import read_jsonl
from tests.test_every_method import ACTIVE, CASES, FAMILIES, QUICK, preset

SOURCES = {"resnet": {"voice": "spec", "face": "frames"}, "conformer": {"voice": "wav", "face": "face_feats"}}
RENAME = {"audio": "voice", "visual": "face"}
FAST = {("mlb", "resnet"), ("mslr", "resnet")}


def renamed(family: str) -> list[str]:
    """The family's tiny-model overrides with the modalities renamed voice and face."""
    mods = ", ".join(f"{m}: {s}" for m, s in SOURCES[family].items())
    out = [f"data.modalities={{{mods}}}"]
    if family == "resnet":
        out.append("model.encoders={voice: {name: resnet18_audio, width: 4}, face: {name: resnet18_visual, width: 4}}")
        out += [o for o in FAMILIES[family] if not o.startswith("model.encoders.")]
    else:
        for item in FAMILIES[family]:
            for old, new in RENAME.items():
                item = item.replace(f"model.encoders.{old}=", f"model.encoders.{new}=")
            out.append(item)
    return out


@pytest.mark.parametrize("method, family", [pytest.param(m, f, id=f"{f}_{m}", marks=() if (m, f) in FAST else pytest.mark.slow)
                                            for m, f in CASES])
def test_every_method_trains_with_modalities_named_otherwise(train_shards, tmp_path, method, family):
    from trainer.config import load_config
    from trainer.evaluate import evaluate_run
    from trainer.loop import train

    out = str(tmp_path / "run")
    cfg = load_config(preset(method, family), [*renamed(family), *QUICK, *ACTIVE.get(method, [])])
    assert set(cfg["model"]["encoders"]) == {"voice", "face"}
    metrics = train(cfg, train_shards, out)
    assert set(metrics["unimodal_accuracy"]) == {"voice", "face"}
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    keys = {k for r in records for k in r} | {k for r in records for v in r.values() if isinstance(v, dict) for k in v}
    assert not [k for k in keys if "audio" in k or "visual" in k], keys
    if method == "mlb":  # the per-step coefficients carry the new names
        assert {"r/voice", "k/voice", "r/face", "k/face"} <= keys
    if method == "mslr":  # the reference's starting scales, by position: voice 0.9, face 1.1
        first = next(r for r in records if r.get("kind") == "train")
        assert first["lr_scale/voice"] == pytest.approx(0.9) and first["lr_scale/face"] == pytest.approx(1.1)
    after = evaluate_run(out, "test")
    assert after["accuracy"] == metrics["accuracy"] and set(after["unimodal_accuracy"]) == {"voice", "face"}
    with open(os.path.join(out, "eval_test.json"), encoding="utf-8") as fh:
        assert json.load(fh)["classes"] == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
