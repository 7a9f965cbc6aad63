"""OGM-GE, MMCosine and MSLR on a tiny real ``MultimodalModel`` (CPU, no data)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avbalance.errors import UserError
from trainer.balancing import build_balancer
from trainer.balancing.mmcosine import CosineLateFusion
from trainer.balancing.ogm_ge import ogm_coefficients, ogm_ratios
from trainer.fusion.late import LateLinear
from trainer.fusion.mlp import MidMLP  # noqa: F401  (registers mid_mlp)
from trainer.fusion import FUSIONS
from trainer.optim import build_schedule
from trainer.model import MultimodalModel
from tiny_model import TinyEncoder  # the shared Linear + tanh test encoder

N_CLASSES = 4


def make(modalities=("audio", "visual"), fusion: str = "late_linear", in_dim: int = 3, dim: int = 5,
         batch_size: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    encoders = {m: TinyEncoder(in_dim + i, dim) for i, m in enumerate(modalities)}
    dims = {m: dim for m in modalities}
    model = MultimodalModel(encoders, FUSIONS.get(fusion)(dims, N_CLASSES), N_CLASSES)
    batch = {
        "inputs": {m: {"x": torch.randn(batch_size, in_dim + i)} for i, m in enumerate(modalities)},
        "label": torch.arange(batch_size) % N_CLASSES,
    }
    return model, batch


def backward(model, balancer, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["inputs"])
    loss, _ = balancer.compute_loss(model, batch, out)
    loss.backward()
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- OGM-GE --------------------------------------------------------------------------------
def test_ogm_rule_by_hand() -> None:
    # scores [3, 1]: rho = [3, 1/3]; k_a = 1 - tanh(0.8 * 3) = 1 - 0.98367485769 = 0.01632514231
    assert ogm_ratios(torch.tensor([3.0, 1.0])).tolist() == pytest.approx([3.0, 1 / 3], rel=1e-6)
    k = ogm_coefficients(ogm_ratios(torch.tensor([3.0, 1.0])), alpha=0.8)
    assert k.tolist() == pytest.approx([0.01632514231, 1.0], rel=1e-5)
    # shifted: 1 - tanh(0.8 * (3 - 1)) = 1 - tanh(1.6) = 1 - 0.92166855440 = 0.07833144560
    k = ogm_coefficients(ogm_ratios(torch.tensor([3.0, 1.0])), alpha=0.8, shifted=True)
    assert k.tolist() == pytest.approx([0.07833144560, 1.0], rel=1e-5)
    # three modalities [2, 1, 1]: rho = [2 / 1, 1 / 1.5, 1 / 1.5]; only the first is slowed
    r = ogm_ratios(torch.tensor([2.0, 1.0, 1.0]))
    assert r.tolist() == pytest.approx([2.0, 2 / 3, 2 / 3], rel=1e-6)
    assert ogm_coefficients(r, 0.8).tolist() == pytest.approx([1 - math.tanh(1.6), 1.0, 1.0], rel=1e-6)
    # equal scores: nobody dominates
    assert ogm_coefficients(ogm_ratios(torch.tensor([0.5, 0.5]))).tolist() == [1.0, 1.0]


def test_ogm_scales_only_the_dominant_encoder() -> None:
    model, batch = make()
    with torch.no_grad():  # make audio clearly dominant: its class weights are large, visual's tiny
        w = model.fusion.fc.weight
        w[:, 5:] *= 0.01
        w[:, :5] *= 20
    balancer = build_balancer("ogm_ge", model, modulation="OGM", alpha=0.8)
    balancer.on_epoch_start(model, 0)
    out = backward(model, balancer, batch)
    before = grads(model)
    balancer.after_backward(model, out, batch)
    after = grads(model)

    # by hand: split the fused head as x_m W_m^T + b / 2, score on the true class
    y = batch["label"]
    w, b = model.fusion.fc.weight.detach(), model.fusion.fc.bias.detach()
    feats = {m: f.detach() for m, f in out.features.items()}
    la = feats["audio"] @ w[:, :5].T + b / 2
    lv = feats["visual"] @ w[:, 5:].T + b / 2
    sa = la.softmax(-1)[torch.arange(6), y].sum()
    sv = lv.softmax(-1)[torch.arange(6), y].sum()
    rho_a = (sa / sv).item()
    assert rho_a > 1
    k = 1 - math.tanh(0.8 * rho_a)
    log = balancer.log()
    assert log["ratio/audio"] == pytest.approx(rho_a, rel=1e-5)
    assert log["ratio/visual"] == pytest.approx(1 / rho_a, rel=1e-5)
    assert log["k/audio"] == pytest.approx(k, rel=1e-5) and log["k/visual"] == 1.0

    for name, g in before.items():
        if name.startswith("encoders.audio."):
            torch.testing.assert_close(after[name], g * k)
        else:  # visual encoder, unimodal heads, fusion: untouched
            torch.testing.assert_close(after[name], g, rtol=0, atol=0)


def test_ogm_ge_noise_matches_gradient_std() -> None:
    model, batch = make(in_dim=400, dim=300, batch_size=32, seed=1)  # encoder weights 300 x 400
    balancer = build_balancer("ogm_ge", model, seed=3)
    balancer.on_epoch_start(model, 0)
    out = backward(model, balancer, batch)
    before = grads(model)
    balancer.after_backward(model, out, batch)
    after = grads(model)
    log = balancer.log()
    for m in ("audio", "visual"):  # noise on both encoders (reference code); k only on the dominant
        name = f"encoders.{m}.proj.weight"
        noise = after[name] - before[name] * log[f"k/{m}"]
        std = before[name].std().item()
        assert noise.std().item() == pytest.approx(std, rel=0.03)
        assert abs(noise.mean().item()) < 0.03 * std
    torch.testing.assert_close(after["fusion.fc.weight"], before["fusion.fc.weight"], rtol=0, atol=0)


def test_ogm_window_and_options() -> None:
    model, batch = make()
    balancer = build_balancer("ogm_ge", model, modulation_starts=1, modulation_ends=2)
    for epoch, active in ((0, False), (1, True), (2, True), (3, False)):
        balancer.on_epoch_start(model, epoch)
        out = backward(model, balancer, batch)
        before = grads(model)
        balancer.after_backward(model, out, batch)
        changed = any(not torch.equal(g, model.get_parameter(n).grad) for n, g in before.items())
        assert changed == active, epoch
    with pytest.raises(UserError, match="modulation"):
        build_balancer("ogm_ge", model, modulation="GE")
    with pytest.raises(UserError, match="alpha"):
        build_balancer("ogm_ge", model, alpha=0)


def test_ogm_after_backward_with_bf16_features() -> None:
    """The loop runs the forward under bf16 autocast on CUDA and after_backward outside it."""
    model, batch = make()
    balancer = build_balancer("ogm_ge", model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch["inputs"])
        loss, _ = balancer.compute_loss(model, batch, out)
    assert out.features["audio"].dtype == torch.bfloat16
    loss.backward()
    balancer.after_backward(model, out, batch)
    assert set(balancer.log()) == {"ratio/audio", "ratio/visual", "k/audio", "k/visual"}


def test_ogm_default_window_is_the_reference_share_of_the_run() -> None:
    model, _ = make()
    # GeWu-Lab/OGM-GE_CVPR2022 main.py: epochs 0..50 of 100 (inclusive)
    assert build_balancer("ogm_ge", model, total_epochs=100).modulation_ends == 50
    balancer = build_balancer("ogm_ge", model, total_epochs=50)
    assert (balancer.modulation_starts, balancer.modulation_ends) == (0, 25)
    balancer.on_epoch_start(model, 26)
    assert not balancer.active()
    assert build_balancer("ogm_ge", model).modulation_ends == 50  # run length unknown: the reference's


@pytest.mark.parametrize("name", ["ogm_ge", "mmcosine"])
def test_refuses_non_decomposable_fusion(name: str) -> None:
    model, _ = make(fusion="mid_mlp")
    with pytest.raises(UserError, match=f"{name} needs a decomposable fusion head.*got mid_mlp"):
        build_balancer(name, model)


# -- MMCosine --------------------------------------------------------------------------------
def test_mmcosine_logits_are_scaled_cosines() -> None:
    model, batch = make()
    old_w = model.fusion.fc.weight.detach().clone()
    balancer = build_balancer("mmcosine", model, scale=7.0)
    fusion = model.fusion
    assert isinstance(fusion, CosineLateFusion) and fusion.decomposable and fusion.bias is None
    torch.testing.assert_close(fusion.weight.detach(), old_w)  # starts from the old weight
    assert fusion.weight.device == old_w.device

    out = model(batch["inputs"])
    w = fusion.weight.detach()
    expected = torch.zeros(6, N_CLASSES)
    for m, cols in (("audio", slice(0, 5)), ("visual", slice(5, 10))):
        x = out.features[m].detach()
        for i in range(6):
            for c in range(N_CLASSES):
                wc = w[c, cols]
                expected[i, c] += 7.0 * float(x[i] @ wc) / (float(x[i].norm()) * float(wc.norm()))
    torch.testing.assert_close(out.fused.detach(), expected, rtol=1e-5, atol=1e-5)
    parts = fusion.per_modality_logits(out.features)
    torch.testing.assert_close(sum(parts.values()), out.fused)
    assert all(p.abs().max() <= 7.0 + 1e-5 for p in parts.values())

    loss, parts = balancer.compute_loss(model, batch, out)
    assert set(parts) == {"ce_fused"}
    assert loss.item() == pytest.approx(F.cross_entropy(out.fused, batch["label"]).item(), rel=1e-6)
    # configuring again (resume) keeps the cosine head; its weight is what the optimizer sees
    build_balancer("mmcosine", model)
    assert model.fusion is fusion
    assert any(p is fusion.weight for p in balancer.param_groups(model, 0.1)[0]["params"])


# -- MSLR ------------------------------------------------------------------------------------
def _optimizer(balancer, model):
    optimizer = torch.optim.SGD(balancer.param_groups(model, 0.1), lr=0.1)
    balancer.attach_optimizer(optimizer)
    return optimizer


def _scales(optimizer):
    return {g["name"]: g.get("lr_scale", 1.0) for g in optimizer.param_groups}


def _reference_mslr(accs: list[dict[str, float]], init: dict[str, float]) -> list[dict[str, float]]:
    """lihong2303/AGM_ICCV2023 run/CREMAD_main.py: the coefficient each epoch's end leaves for
    the next epoch, mslr_coeff = init * (acc / mean(last 5 accuracies)) once 5 are remembered."""
    memory = {m: [] for m in init}
    ratio = {m: 1.0 for m in init}
    out = []
    for acc in accs:
        for m in init:
            if len(memory[m]) < 5:
                memory[m].append(acc[m])
            else:
                ratio[m] = acc[m] / np.mean(memory[m])
                memory[m] = memory[m][1:] + [acc[m]]
        out.append({m: init[m] * ratio[m] for m in init})
    return out


def test_mslr_scales_follow_the_reference() -> None:
    model, _ = make()
    balancer = build_balancer("mslr", model)
    optimizer = _optimizer(balancer, model)
    assert [g["name"] for g in optimizer.param_groups] == ["audio", "visual", "shared"]
    assert _scales(optimizer) == pytest.approx({"audio": 0.9, "visual": 1.1, "shared": 1.0})  # reference start
    schedule = build_schedule({"optim": {"schedule": "none", "warmup_steps": 0}}, optimizer, 100)
    g = torch.Generator().manual_seed(0)
    accs = [{"audio": 0.3 + 0.05 * e + 0.03 * float(torch.rand(1, generator=g)),
             "visual": 0.4 - 0.02 * e + 0.1 * float(torch.rand(1, generator=g))} for e in range(9)]
    want = _reference_mslr(accs, {"audio": 0.9, "visual": 1.1})
    seen_up = seen_down = False
    for epoch, (acc, w) in enumerate(zip(accs, want)):
        # late_linear is decomposable: the accuracy of each modality's additive share is read
        balancer.on_epoch_end(model, epoch, {"accuracy": 0.5, "share_accuracy": acc,
                                             "unimodal_accuracy": {"audio": 0.0, "visual": 0.0}})
        assert _scales(optimizer) == pytest.approx({**w, "shared": 1.0}, rel=1e-9), epoch
        optimizer.step()
        schedule.step()  # the schedule honours lr_scale
        assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
            {"audio": 0.1 * w["audio"], "visual": 0.1 * w["visual"], "shared": 0.1})
        seen_up |= w["audio"] > 0.9
        seen_down |= w["visual"] < 1.1
    assert seen_up and seen_down  # it goes up and down, not only down

    # round trip through a weights_only checkpoint into a fresh balancer and optimizer
    buf = io.BytesIO()
    torch.save(balancer.state_dict(), buf)
    buf.seek(0)
    fresh = build_balancer("mslr", model)
    optimizer2 = _optimizer(fresh, model)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.history == balancer.history and fresh.scale == balancer.scale
    assert _scales(optimizer2) == pytest.approx({**want[-1], "shared": 1.0})


def test_mslr_options() -> None:
    model, _ = make()
    balancer = build_balancer("mslr", model, window=2, scales={"visual": 0.5})
    optimizer = _optimizer(balancer, model)
    assert _scales(optimizer) == {"audio": 1.0, "visual": 0.5, "shared": 1.0}
    for epoch, acc in enumerate(({"audio": 0.5, "visual": 0.5}, {"audio": 0.4, "visual": 0.6},
                                 {"audio": 0.9, "visual": 0.55})):
        balancer.on_epoch_end(model, epoch, {"share_accuracy": acc})
    assert _scales(optimizer) == pytest.approx({"audio": 2.0, "visual": 0.5 * 0.55 / 0.55, "shared": 1.0})
    balancer.on_epoch_end(model, 3, {"accuracy": 0.3})  # no per-modality accuracies: nothing changes
    assert _scales(optimizer) == pytest.approx({"audio": 2.0, "visual": 0.5, "shared": 1.0})
    with pytest.raises(UserError, match="unknown modalities"):
        build_balancer("mslr", model, scales={"text": 1.0})
    with pytest.raises(UserError, match="window"):
        build_balancer("mslr", model, window=0)


def test_mslr_loss_is_the_late_fusion_ce() -> None:
    model, batch = make()
    out = model(batch["inputs"])
    loss, parts = build_balancer("mslr", model).compute_loss(model, batch, out)
    # the reference's criterion(out_a + out_v, label): no unimodal-head terms
    assert set(parts) == {"ce_fused"}
    assert loss.item() == pytest.approx(F.cross_entropy(out.fused, batch["label"]).item())
    # a fusion with no additive shares: the heads are trained and their accuracy read
    model, batch = make(fusion="mid_mlp")
    balancer = build_balancer("mslr", model)
    _, parts = balancer.compute_loss(model, batch, model(batch["inputs"]))
    assert set(parts) == {"ce_fused", "ce_audio", "ce_visual"}
    for epoch in range(6):
        balancer.on_epoch_end(model, epoch, {"unimodal_accuracy": {"audio": 0.2 + 0.1 * epoch, "visual": 0.5}})
    assert balancer.scale["audio"] == pytest.approx(0.9 * 0.7 / 0.4)


# -- every new method: two optimizer steps ---------------------------------------------------
@pytest.mark.parametrize("name", ["ogm_ge", "mmcosine", "mslr"])
def test_two_steps_without_nan(name: str) -> None:
    model, batch = make()
    balancer = build_balancer(name, model)
    optimizer = _optimizer(balancer, model)
    balancer.on_epoch_start(model, 0, loader=[batch])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = model(batch["inputs"])
        loss, parts = balancer.compute_loss(model, batch, out)
        assert torch.isfinite(loss) and all(v == v for v in parts.values())
        loss.backward()
        balancer.after_backward(model, out, batch)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(start[n], p) for n, p in model.named_parameters())
    balancer.on_epoch_end(model, 0, {"accuracy": 0.5, "unimodal_accuracy": {"audio": 0.4, "visual": 0.3}})
    assert all(isinstance(v, float) and v == v for v in balancer.log().values())
