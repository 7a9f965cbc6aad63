"""Encoders, fusions and the multimodal model on tiny random batches (CPU, offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from avbalance.errors import UserError  # noqa: E402
from trainer.encoders import ENCODERS, masked_mean  # noqa: E402
from trainer.fusion import FUSIONS  # noqa: E402
from trainer.model import ModelOutput, MultimodalModel, build_model  # noqa: E402

TINY_W2V = dict(
    keep_layers=2, d_model=16, n_blocks=2, n_heads=2, ff_mult=2, conv_kernel=7,
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
    cnn_dim=(32, 32), cnn_kernel=(10, 3), cnn_stride=(5, 2), pos_conv_kernel=16, pos_conv_groups=2,
    layerdrop=0.0, mask_time_prob=0.0,
)
TINY_CONFORMER = dict(d_model=16, n_blocks=2, n_heads=2, ff_mult=2, conv_kernel=7)


def lengths_mask(lengths: list[int], total: int) -> torch.Tensor:
    """(B, total) bool: True for the first lengths[i] steps of row i."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def pad_with_garbage(x: torch.Tensor, mask: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``extra`` steps (dim 1) of large random values, masked out."""
    junk = 1e3 * torch.randn(x.shape[0], extra, *x.shape[2:])
    return torch.cat([x, junk], dim=1), torch.cat([mask, torch.zeros(x.shape[0], extra, dtype=torch.bool)], dim=1)


@dataclass
class EncoderCase:
    kwargs: dict[str, Any]
    out_dim: int
    make: Callable[[], dict[str, torch.Tensor]]  # a padded batch of 3
    pad: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None  # same clips, more padding


def _visual_batch() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(3, 4, 3, 32, 32), "mask": lengths_mask([4, 2, 1], 4)}


def _face_batch() -> dict[str, torch.Tensor]:
    mask = lengths_mask([9, 5, 7], 9)
    mask[0, 3] = False  # a frame without a face inside the clip
    x = torch.randn(3, 9, 1408).half()
    x[~mask] = 0  # the shards store zeros where no face
    return {"x": x, "mask": mask}


def _wave_batch() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(3, 1600), "mask": lengths_mask([1600, 1200, 900], 1600)}


def _pad(extra: int) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def pad(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, mask = pad_with_garbage(batch["x"].float(), batch["mask"], extra)
        return {"x": x, "mask": mask}

    return pad


ENCODER_CASES: dict[str, EncoderCase] = {
    "resnet18_audio": EncoderCase({"width": 8}, 64, lambda: {"x": torch.randn(3, 1, 64, 48)}, None),
    "resnet18_visual": EncoderCase({"width": 8}, 64, _visual_batch, _pad(3)),
    "resnet18_flow": EncoderCase({"width": 8, "stack": 2}, 64,
                                 lambda: {"x": torch.randn(3, 4, 4, 32, 32), "mask": lengths_mask([4, 2, 1], 4)}, _pad(3)),
    "face_conformer": EncoderCase(dict(TINY_CONFORMER), 16, _face_batch, _pad(6)),
    "wav2vec2_conformer": EncoderCase(dict(TINY_W2V), 16, _wave_batch, _pad(500)),
}


def case_for(name: str) -> EncoderCase:
    if name not in ENCODER_CASES:
        pytest.fail(f"encoder {name!r} is registered but has no test case in ENCODER_CASES")
    return ENCODER_CASES[name]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_forward_backward(name: str) -> None:
    case = case_for(name)
    enc = ENCODERS.get(name)(**case.kwargs)
    assert enc.out_dim == case.out_dim
    enc.train()
    out = enc(**case.make())
    assert out.shape == (3, case.out_dim)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"no (finite) gradient for {no_grad}"
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_ignores_padding(name: str) -> None:
    case = case_for(name)
    if case.pad is None:
        pytest.skip(f"{name} takes fixed-size input, no padding")
    enc = ENCODERS.get(name)(**case.kwargs).eval()
    batch = case.make()
    with torch.no_grad():
        ref = enc(**batch)
        padded = enc(**case.pad(batch))
        alone = enc(**{k: v[1:2] for k, v in batch.items()})  # nor on the other clips
    torch.testing.assert_close(padded, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone, ref[1:2], atol=1e-4, rtol=1e-4)


def test_visual_padding_stays_out_of_batch_norm() -> None:
    """In train mode too: padded frames never enter the trunk, so batch statistics agree."""
    enc = ENCODERS.get("resnet18_visual")(width=8).train()
    batch = _visual_batch()
    ref = enc(**batch)
    padded = enc(**_pad(2)(batch))
    torch.testing.assert_close(padded, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18_visual", "face_conformer"])
def test_encoder_clip_with_nothing_valid_gives_zeros(name: str) -> None:
    case = case_for(name)
    enc = ENCODERS.get(name)(**case.kwargs).train()
    batch = case.make()
    batch["mask"][2] = False
    out = enc(**batch)
    assert torch.isfinite(out).all()
    assert torch.all(out[2] == 0)
    out.sum().backward()


def test_face_conformer_nan_garbage_in_padding() -> None:
    enc = ENCODERS.get("face_conformer")(**TINY_CONFORMER).eval()
    batch = _face_batch()
    x = batch["x"].float()
    ref = enc(x=x, mask=batch["mask"])
    x[~batch["mask"]] = float("nan")
    torch.testing.assert_close(enc(x=x, mask=batch["mask"]), ref)


def test_masked_mean() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0], [0.0]]))


def test_wav2vec2_freezes_cnn_and_keeps_layers() -> None:
    enc = ENCODERS.get("wav2vec2_conformer")(**{**TINY_W2V, "num_layers": 3, "keep_layers": 2})
    assert len(enc.w2v.encoder.layers) == 2
    assert enc.w2v.config.num_hidden_layers == 2
    cnn = list(enc.w2v.feature_extractor.parameters())
    assert cnn and not any(p.requires_grad for p in cnn)
    assert all(p.requires_grad for p in enc.w2v.encoder.parameters())
    with pytest.raises(UserError, match="keep_layers"):
        ENCODERS.get("wav2vec2_conformer")(**{**TINY_W2V, "num_layers": 2, "keep_layers": 3})


def test_wav2vec2_frame_mask_matches_transformers() -> None:
    enc = ENCODERS.get("wav2vec2_conformer")(**TINY_W2V)
    mask = lengths_mask([1600, 1201, 900, 33], 1600)
    n_frames = int(enc.w2v._get_feat_extract_output_lengths(torch.tensor(1600)))
    expected = enc.w2v._get_feature_vector_attention_mask(n_frames, mask.long())
    assert torch.equal(enc.frame_mask(mask, n_frames), expected)


def test_wav2vec2_pretrained_dir_errors(tmp_path) -> None:
    factory = ENCODERS.get("wav2vec2_conformer")
    with pytest.raises(UserError, match="not a directory"):
        factory(**{**TINY_W2V, "pretrained_dir": str(tmp_path / "missing")})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        factory(**{**TINY_W2V, "pretrained_dir": str(tmp_path)})


def test_wav2vec2_loads_local_pretrained_dir(tmp_path) -> None:
    source = ENCODERS.get("wav2vec2_conformer")(**{**TINY_W2V, "num_layers": 3, "keep_layers": 3})
    source.w2v.save_pretrained(str(tmp_path))
    enc = ENCODERS.get("wav2vec2_conformer")(
        pretrained_dir=str(tmp_path), keep_layers=1, **TINY_CONFORMER, layerdrop=0.0
    )
    assert len(enc.w2v.encoder.layers) == 1
    assert enc.w2v.config.layerdrop == 0.0
    loaded = enc.w2v.encoder.layers[0].attention.q_proj.weight
    torch.testing.assert_close(loaded, source.w2v.encoder.layers[0].attention.q_proj.weight)
    assert not any(p.requires_grad for p in enc.w2v.feature_extractor.parameters())


# ---------------------------------------------------------------- fusions

DIMS = {"audio": 8, "visual": 12, "text": 6}


@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("name", FUSIONS.names())
def test_fusion_forward_backward(name: str, n_mod: int) -> None:
    dims = dict(list(DIMS.items())[:n_mod])
    kwargs = {"hidden": 16} if name in ("mid_mlp", "gated", "gmu") else {"d": 16} if name == "tf" else {}
    fusion = FUSIONS.get(name)(dims, 5, **kwargs)
    assert isinstance(fusion.decomposable, bool)
    feats = {m: torch.randn(4, d, requires_grad=True) for m, d in dims.items()}
    out = fusion(feats)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    for m, x in feats.items():
        assert x.grad is not None and x.grad.abs().sum() > 0, f"no gradient to {m}"
    missing = [n for n, p in fusion.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    with pytest.raises(ValueError):
        fusion({m: feats[m] for m in list(dims)[:1]})


@pytest.mark.parametrize("n_mod", [2, 3])
def test_late_linear_decomposes(n_mod: int) -> None:
    dims = dict(list(DIMS.items())[:n_mod])
    fusion = FUSIONS.get("late_linear")(dims, 5)
    assert fusion.decomposable
    feats = {m: torch.randn(4, d) for m, d in dims.items()}
    fused = fusion(feats)
    parts = fusion.per_modality_logits(feats)
    assert list(parts) == list(dims)
    torch.testing.assert_close(sum(parts.values()) + fusion.bias, fused)
    torch.testing.assert_close(sum(fusion.per_modality_logits(feats, split_bias=True).values()), fused)
    # a modality's term depends on that modality only
    other = dict(feats, audio=torch.randn(4, dims["audio"]))
    torch.testing.assert_close(fusion.per_modality_logits(other)["visual"], parts["visual"])


def test_non_decomposable_fusions() -> None:
    for name in ("mid_mlp", "film", "gated", "gmu", "tf"):
        assert FUSIONS.get(name).decomposable is False


def test_gated_is_ogm_ge_gated_fusion() -> None:
    """GeWu-Lab/OGM-GE_CVPR2022 models/fusion_modules.py GatedFusion (x_gate=True), in plain torch:
    out_x = fc_x(x), out_y = fc_y(y), output = fc_out(sigmoid(out_x) * out_y)."""
    fusion = FUSIONS.get("gated")({"audio": 8, "visual": 12}, 5, hidden=16)
    fc_x, fc_y, fc_out = fusion.proj["audio"], fusion.proj["visual"], fusion.fc
    x, y = torch.randn(4, 8), torch.randn(4, 12)
    want = fc_out(torch.mul(torch.sigmoid(fc_x(x)), fc_y(y)))
    torch.testing.assert_close(fusion({"audio": x, "visual": y}), want)
    other = FUSIONS.get("gated")({"audio": 8, "visual": 12}, 5, hidden=16, gate="visual")
    want = other.fc(torch.sigmoid(other.proj["visual"](y)) * other.proj["audio"](x))
    torch.testing.assert_close(other({"audio": x, "visual": y}), want)
    with pytest.raises(UserError, match="gate"):
        FUSIONS.get("gated")({"audio": 8, "visual": 12}, 5, gate="text")
    with pytest.raises(UserError):
        FUSIONS.get("gated")({"audio": 8}, 5)


def test_gmu_is_the_gated_multimodal_unit() -> None:
    """Arevalo et al. 2017 for two modalities: h = z tanh(W_a a) + (1 - z) tanh(W_v v), z = sigmoid(...)."""
    fusion = FUSIONS.get("gmu")({"audio": 8, "visual": 12}, 5, hidden=16)
    a, v = torch.randn(4, 8), torch.randn(4, 12)
    gates = fusion.gate(torch.cat([a, v], -1)).view(4, 2, 16)
    z = torch.sigmoid(gates[:, 0] - gates[:, 1])
    h = z * torch.tanh(fusion.proj["audio"](a)) + (1 - z) * torch.tanh(fusion.proj["visual"](v))
    torch.testing.assert_close(fusion({"audio": a, "visual": v}), fusion.fc(h))


def test_film_modes() -> None:
    dims = dict(DIMS)
    source = FUSIONS.get("film")(dims, 5, conditioner="visual")
    assert source.pairs == [("audio", "visual"), ("text", "visual")]
    ring = FUSIONS.get("film")(dims, 5, mode="ring")
    assert ring.pairs == [("audio", "visual"), ("visual", "text"), ("text", "audio")]
    with pytest.raises(UserError):
        FUSIONS.get("film")({"audio": 8}, 5)
    with pytest.raises(UserError):
        FUSIONS.get("film")(dims, 5, conditioner="smell")


# ---------------------------------------------------------------- model

AV_CFG = {
    "n_classes": 6,
    "encoders": {"audio": {"name": "resnet18_audio", "width": 8}, "visual": {"name": "resnet18_visual", "width": 8}},
    "fusion": {"name": "late_linear"},
}


def av_inputs() -> dict[str, dict[str, torch.Tensor]]:
    return {"audio": {"x": torch.randn(3, 1, 64, 48)}, "visual": _visual_batch()}


def test_model_forward() -> None:
    model = build_model(AV_CFG)
    assert model.modalities == ["audio", "visual"]
    out = model(av_inputs())
    assert isinstance(out, ModelOutput)
    assert out.fused.shape == (3, 6)
    assert {m: t.shape for m, t in out.unimodal.items()} == {"audio": (3, 6), "visual": (3, 6)}
    assert {m: t.shape for m, t in out.features.items()} == {"audio": (3, 64), "visual": (3, 64)}
    (out.fused.sum() + sum(u.sum() for u in out.unimodal.values())).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_modality_params_partition() -> None:
    model = build_model({**AV_CFG, "fusion": {"name": "mid_mlp", "hidden": 16}})
    groups = model.modality_params()
    ids = {m: {id(p) for p in ps} for m, ps in groups.items()}
    assert all(len(ids[m]) == len(groups[m]) for m in groups)
    assert not ids["audio"] & ids["visual"]
    for m in model.modalities:
        expected = {id(p) for p in [*model.encoders[m].parameters(), *model.heads[m].parameters()]}
        assert ids[m] == expected
    shared = {id(p) for p in model.shared_params()}
    assert shared == {id(p) for p in model.fusion.parameters()}
    assert not shared & (ids["audio"] | ids["visual"])
    assert shared | ids["audio"] | ids["visual"] == {id(p) for p in model.parameters()}


def test_modality_params_trainable_only() -> None:
    cfg = {"n_classes": 6, "encoders": {"audio": {"name": "wav2vec2_conformer", **TINY_W2V}}, "fusion": {"name": "late_linear"}}
    model = build_model(cfg)
    frozen = {id(p) for p in model.encoders["audio"].w2v.feature_extractor.parameters()}
    assert frozen <= {id(p) for p in model.modality_params()["audio"]}
    assert not frozen & {id(p) for p in model.modality_params(trainable_only=True)["audio"]}


def test_drop_modality_zeroes_features() -> None:
    model = build_model(AV_CFG)
    calls = []
    model.encoders["visual"].register_forward_hook(lambda *a: calls.append(1))
    out = model({"audio": av_inputs()["audio"]}, drop={"visual"})
    assert not calls, "a dropped modality must not be encoded"
    assert torch.all(out.features["visual"] == 0) and out.features["visual"].shape == (3, 64)
    torch.testing.assert_close(out.unimodal["visual"], model.heads["visual"].bias.expand(3, -1))
    assert out.features["audio"].abs().sum() > 0
    out.fused.sum().backward()
    assert all(p.grad is None for p in model.encoders["visual"].parameters())
    both = model(av_inputs(), drop=frozenset({"audio", "visual"}))
    torch.testing.assert_close(both.fused, model.fusion.bias.expand(3, -1))
    with pytest.raises(ValueError):
        model(av_inputs(), drop={"smell"})


def test_model_with_every_fusion_and_sequence_encoders() -> None:
    for name in FUSIONS.names():
        cfg = {
            "n_classes": 4,
            "encoders": {
                "audio": {"name": "resnet18_audio", "width": 4},
                "face": {"name": "face_conformer", **TINY_CONFORMER},
            },
            "fusion": {"name": name},
        }
        model = build_model(cfg)
        out = model({"audio": {"x": torch.randn(3, 1, 32, 32)}, "face": _face_batch()}, drop={"audio"})
        assert out.fused.shape == (3, 4) and torch.isfinite(out.fused).all()


def test_build_model_errors() -> None:
    with pytest.raises(UserError, match="unknown encoder"):
        build_model({**AV_CFG, "encoders": {"audio": {"name": "nope"}}})
    with pytest.raises(UserError, match="bad options"):
        build_model({**AV_CFG, "encoders": {"audio": {"name": "resnet18_audio", "wdth": 8}}})
    with pytest.raises(UserError, match="unknown fusion"):
        build_model({**AV_CFG, "fusion": {"name": "nope"}})
    with pytest.raises(UserError, match="bad options"):
        build_model({**AV_CFG, "fusion": {"name": "late_linear", "hidden": 3}})
    with pytest.raises(UserError, match="n_classes"):
        build_model({"encoders": AV_CFG["encoders"], "fusion": AV_CFG["fusion"]})


def test_model_rejects_mismatched_fusion() -> None:
    enc = {"audio": ENCODERS.get("resnet18_audio")(width=4)}
    fusion = FUSIONS.get("late_linear")({"visual": 32}, 3)
    with pytest.raises(UserError):
        MultimodalModel(enc, fusion, 3)
    assert isinstance(MultimodalModel(enc, FUSIONS.get("late_linear")({"audio": 32}, 3), 3), nn.Module)


def test_model_under_bf16_autocast() -> None:
    """The training loop runs bf16 autocast on CUDA; CPU autocast exercises the same dtype mixing."""
    cfg = {
        "n_classes": 4,
        "encoders": {
            "visual": {"name": "resnet18_visual", "width": 4},
            "face": {"name": "face_conformer", **TINY_CONFORMER},
        },
        "fusion": {"name": "gated", "hidden": 8},
    }
    model = build_model(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model({"visual": _visual_batch(), "face": _face_batch()})
        dropped = model({"face": _face_batch()}, drop={"visual"})
    assert torch.isfinite(out.fused.float()).all() and torch.isfinite(dropped.fused.float()).all()
    out.fused.float().sum().backward()


def test_heads_start_as_the_reference_code_initialises_them():
    """model.head_init=xavier_normal (the run config's default): every Linear of the heads and
    the fusion has zero bias and the Xavier-normal weight std; the encoders are untouched."""
    from trainer.config import load_config

    cfg = load_config(None, ["model.n_classes=6", "model.encoders.audio.width=8", "model.encoders.visual.width=8"])["model"]
    assert cfg["head_init"] == "xavier_normal"
    torch.manual_seed(0)
    xavier = build_model(cfg)
    torch.manual_seed(0)
    plain = build_model({**cfg, "head_init": "torch"})
    fc = xavier.fusion.fc
    want = (2.0 / (fc.in_features + fc.out_features)) ** 0.5
    assert torch.count_nonzero(fc.bias) == 0 and abs(float(fc.weight.std()) / want - 1) < 0.15
    assert all(torch.count_nonzero(h.bias) == 0 for h in xavier.heads.values())
    assert not torch.equal(plain.fusion.fc.weight, fc.weight) and torch.count_nonzero(plain.fusion.fc.bias) > 0
    for a, b in zip(xavier.encoders.parameters(), plain.encoders.parameters()):
        assert torch.equal(a, b)  # the encoders start from the same weights either way
    with pytest.raises(UserError, match="model.head_init"):
        build_model({**cfg, "head_init": "kaiming"})
