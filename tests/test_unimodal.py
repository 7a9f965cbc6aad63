"""Unimodal controls: one-modality models from presets or ``--set data.modalities=...``, the
balancing methods' refusal of them, fusions over one modality, sweeps and report labels."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from avbalance.errors import UserError
from experiments.collect import method_label
from experiments.sweep import load_sweep
from tests.conftest import REPO
from tests.tiny_model import N_CLASSES, TinyEncoder
from trainer.balancing import BALANCERS, build_balancer
from trainer.config import load_config
from trainer.fusion import FUSIONS
from trainer.run_model import check_inputs
from trainer.model import MultimodalModel, build_model

CONFIGS = os.path.join(REPO, "trainer", "configs")
SMALL = {"resnet": ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "model.n_classes=6"], "conformer": []}


@pytest.mark.parametrize("family, modality, source", [
    ("resnet", "audio", "spec"), ("resnet", "visual", "frames"),
    ("conformer", "audio", "wav"), ("conformer", "visual", "face_feats"),
])
def test_unimodal_presets_have_one_modality(family, modality, source):
    cfg = load_config(os.path.join(CONFIGS, f"{family}_{modality}_only.yaml"))
    assert cfg["data"]["modalities"] == {modality: source}
    assert list(cfg["model"]["encoders"]) == [modality]
    assert cfg["balancing"]["name"] == "joint"
    check_inputs(cfg)
    two = load_config(os.path.join(CONFIGS, f"{family}_joint.yaml"))
    # everything else is the family's: same encoder, optimiser, schedule, epochs
    assert cfg["model"]["encoders"][modality] == two["model"]["encoders"][modality]
    assert (cfg["optim"], cfg["train"]) == (two["optim"], two["train"])
    assert method_label(cfg) == f"{modality}_only" and method_label(two) == "joint"


def test_set_modalities_replaces_the_mapping_and_narrows_the_encoders():
    path = os.path.join(CONFIGS, "resnet_mlb.yaml")
    cfg = load_config(path, ["data.modalities={visual: frames}", "balancing.name=joint", *SMALL["resnet"][1:]])
    assert cfg["data"]["modalities"] == {"visual": "frames"}
    assert list(cfg["model"]["encoders"]) == ["visual"]
    model = build_model(cfg["model"])
    assert model.modalities == ["visual"]
    # a sub-key adds a modality instead (and the missing encoder is then a clear error)
    added = load_config(path, ["data.modalities.face=face_feats"])
    assert added["data"]["modalities"] == {"audio": "spec", "visual": "frames", "face": "face_feats"}
    with pytest.raises(UserError, match="must name the same modalities"):
        check_inputs(added)
    with pytest.raises(UserError, match="at least one modality"):
        load_config(path, ["data.modalities={}"])


def test_mlb_preset_narrowed_to_one_modality_is_refused_at_build_time():
    cfg = load_config(os.path.join(CONFIGS, "resnet_mlb.yaml"), ["data.modalities={audio: spec}", *SMALL["resnet"][:1], "model.n_classes=6"])
    options = dict(cfg["balancing"])
    with pytest.raises(UserError, match=r"mlb .* needs at least 2 modalities; this model has 1 \(audio\)"):
        build_balancer(options.pop("name"), build_model(cfg["model"]), **options)


def _one_modality(fusion: str = "late_linear", dim: int = 5) -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel({"visual": TinyEncoder(3, dim)}, FUSIONS.get(fusion)({"visual": dim}, N_CLASSES), N_CLASSES)


@pytest.mark.parametrize("method", BALANCERS.names())
def test_every_method_but_joint_refuses_one_modality(method):
    model = _one_modality()
    if method == "joint":
        build_balancer(method, model)
        return
    with pytest.raises(UserError, match=f"{method} balances modalities .* at least 2 modalities.*joint"):
        build_balancer(method, model)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_fusions_over_one_modality(fusion):
    if getattr(FUSIONS.get(fusion), "min_modalities", 1) > 1:
        with pytest.raises(UserError, match="at least 2 modalities"):
            _one_modality(fusion)
        return
    model = _one_modality(fusion)
    x = torch.randn(7, 3)
    out = model({"visual": {"x": x}})
    assert out.fused.shape == (7, N_CLASSES) and list(out.unimodal) == ["visual"]
    if fusion == "late_linear":  # one Linear over the modality's features
        feats = model.encoders["visual"](x)
        assert torch.allclose(out.fused, model.fusion.fc(feats))
        assert torch.allclose(sum(model.fusion.per_modality_logits(out.features, split_bias=True).values()), out.fused)
    out.fused.sum().backward()  # the fusion trains the encoder
    assert model.encoders["visual"].proj.weight.grad.abs().sum() > 0


def test_sweep_accepts_unimodal_methods(tmp_path):
    doc = {"out": str(tmp_path / "runs"), "shards": str(tmp_path / "{split}"),
           "blocks": [{"name": "s", "preset": "resnet", "splits": ["kfold1"], "seeds": [0],
                       "methods": ["audio_only", "visual_only", "joint", "mlb"], "fusions": ["late_linear", "film"]}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    sweep = load_sweep(str(path))
    ids = {r.id for r in sweep.runs}
    assert ids == {f"s/{m}-late_linear/kfold1-s0" for m in ("audio_only", "visual_only", "joint", "mlb")} | {
        "s/joint-film/kfold1-s0", "s/mlb-film/kfold1-s0"}
    unsupported = {u["id"]: u["reason"] for u in sweep.unsupported}
    assert set(unsupported) == {"s/audio_only-film/kfold1-s0", "s/visual_only-film/kfold1-s0"}
    assert all("film needs at least 2 modalities" in r for r in unsupported.values())
    run = next(r for r in sweep.runs if r.method == "visual_only")
    assert run.config == os.path.join(CONFIGS, "resnet_visual_only.yaml")
    # a preset naming an unknown balancing method is caught when the sweep is read
    bad = tmp_path / "resnet_weird.yaml"
    bad.write_text("base: " + os.path.join(CONFIGS, "resnet_base.yaml") + "\nbalancing: {name: nope}\n")
    doc["blocks"][0].update(preset=str(tmp_path / "resnet_{method}.yaml"), methods=["weird"])
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match="unknown balancing method 'nope'"):
        load_sweep(str(path))
