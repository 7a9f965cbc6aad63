"""AGM and PMR on the tiny stand-in model of test_balancing (CPU, no data).

The ``*_reference`` tests recompute a step with the authors' formulas written out in plain
torch (lihong2303/AGM_ICCV2023 run/CREMAD_main.py + model/CREMAD_net.py; fanyunfeng-bit/
Modal-Imbalance-PMR main_Prototype_grad.py) and compare losses and gradients.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_balancing import TinyLate, TinyMLP, grads, make
from trainer.balancing import BALANCERS, build_balancer
from trainer.balancing.agm import agm_coefficients, agm_logits, coalition_values, shapley_logits
from trainer.balancing.pmr import tenth_of


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_registered() -> None:
    assert {"agm", "pmr"} <= set(BALANCERS.names())


# -- AGM -------------------------------------------------------------------------------------
@pytest.mark.parametrize("modalities", [("audio", "visual"), ("audio", "visual", "text")])
def test_agm_forward_count(modalities: tuple[str, ...]) -> None:
    model, batch = make(modalities, fusion=TinyMLP)
    balancer = build_balancer("agm", model)
    out = model(batch["inputs"])
    seen: list[frozenset] = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(frozenset(kwargs.get("drop", ()))),
                                    with_kwargs=True)
    # The loop hands compute_loss the bare model, inside the one module DDP wraps (LossStep).
    balancer.compute_loss(model, batch, out)
    # every proper subset of modalities kept: 2^M - 1 extra forwards (3 for M = 2)
    assert len(seen) == 2 ** len(modalities) - 1
    assert set(seen) == {frozenset(s) for s in _proper_drops(modalities)}
    assert model.training  # mode restored after the eval-mode extra forwards
    # not training: no extra forwards, no state change
    model.eval()
    seen.clear()
    before = balancer.running.clone()
    balancer.compute_loss(model, batch, model(batch["inputs"]))
    assert seen == [frozenset()]  # only the plain forward in the call's argument
    assert torch.equal(balancer.running, before)


def _proper_drops(modalities: tuple[str, ...]) -> list[set]:
    n = len(modalities)
    return [{m for i, m in enumerate(modalities) if mask >> i & 1} for mask in range(1, 2 ** n)]


@pytest.mark.parametrize("modalities", [("audio", "visual"), ("audio", "visual", "text")])
def test_agm_logits_sum_to_the_fused_logits(modalities: tuple[str, ...]) -> None:
    model, batch = make(modalities, fusion=TinyMLP)
    with torch.no_grad():
        full = model(batch["inputs"]).fused
        values = coalition_values(model, batch["inputs"], list(modalities), full)
        phi = shapley_logits(values, list(modalities))
        shares = agm_logits(values, list(modalities))
    assert torch.allclose(sum(phi.values()) + values[frozenset()], full, atol=1e-5)  # Shapley efficiency
    assert torch.allclose(sum(shares.values()), full, atol=1e-5)  # the reference's m_a + m_v = total
    if len(modalities) == 2:
        a, v = (frozenset({m}) for m in modalities)
        # CREMAD_net.py Modality_Audio: 0.5 * (total_out - pad_audio_out + pad_visual_out)
        assert torch.allclose(shares["audio"], 0.5 * (full - values[v] + values[a]), atol=1e-6)


def _agm_reference_step(model: nn.Module, batch: dict, train_score: tuple[float, float], alpha: float,
                        modulate: bool = True) -> tuple[float, dict[str, torch.Tensor], tuple[float, float]]:
    """One AGM step as run/CREMAD_main.py ``train`` and CREMAD_net.py ``GradMod`` compute it
    (masking = our feature dropping). Returns the loss, the gradients and (coeff_a, coeff_v)."""
    model.zero_grad(set_to_none=True)
    x, y = batch["inputs"], batch["label"]
    total_out = model(x).fused
    model.eval()
    pad_visual_out = model(x, drop={"visual"}).fused
    pad_audio_out = model(x, drop={"audio"}).fused
    model.train()
    m_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
    m_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
    score_audio = -torch.log(torch.softmax(m_a, 1)[torch.arange(len(y)), y].clamp_min(1e-8)).mean().item()
    score_visual = -torch.log(torch.softmax(m_v, 1)[torch.arange(len(y)), y].clamp_min(1e-8)).mean().item()
    ratio_a, ratio_v = math.exp(score_visual - score_audio), math.exp(score_audio - score_visual)
    optimal_ratio_a = math.exp(train_score[1] - train_score[0])
    optimal_ratio_v = math.exp(train_score[0] - train_score[1])
    coeff_a = math.exp(alpha * min(optimal_ratio_a - ratio_a, 10))
    coeff_v = math.exp(alpha * min(optimal_ratio_v - ratio_v, 10))
    if not modulate:
        coeff_a = coeff_v = 1.0
    m_a.register_hook(lambda g: g * coeff_a)
    m_v.register_hook(lambda g: g * coeff_v)
    loss = F.cross_entropy(m_a + m_v, y)
    loss.backward()
    return loss.item(), grads(model), (coeff_a, coeff_v)


@pytest.mark.parametrize("fusion", [TinyLate, TinyMLP])
def test_agm_step_matches_reference(fusion: type) -> None:
    model, batch = make(fusion=fusion, seed=3)
    # the reference's train_score_a / _v: mean per-sample CE so far (ours keeps -score)
    train_score = (0.9, 1.7)
    ref_loss, ref_grads, coeff = _agm_reference_step(model, batch, train_score, alpha=1.0)
    assert coeff[0] != pytest.approx(1.0) and coeff[1] != pytest.approx(1.0)

    model.zero_grad(set_to_none=True)
    balancer = build_balancer("agm", model)  # alpha 1.0 as the reference's default
    balancer.modalities = ["audio", "visual"]
    balancer.running, balancer.steps = -torch.tensor(train_score), 7
    loss, _ = balancer.compute_loss(model, batch, model(batch["inputs"]))
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert [balancer.log()["k/audio"], balancer.log()["k/visual"]] == pytest.approx(list(coeff), rel=1e-5)
    got = grads(model)
    assert set(got) >= {n for n in ref_grads if not n.startswith("heads.")}
    for name, g in ref_grads.items():  # encoders *and* the fusion get the scaled shares
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name


def test_agm_coefficient_is_capped_above_only() -> None:
    # rbar_0 - r_0 = e^30 - e^-30: capped at 10 -> e^10; rbar_1 - r_1 = e^-30 - e^30: no floor -> ~0
    k = agm_coefficients(torch.tensor([-30.0, 0.0]), torch.tensor([0.0, -30.0]), alpha=1.0)
    assert k[0].item() == pytest.approx(math.exp(10.0), rel=1e-6)
    assert k[1].item() < 1e-30  # the old code floored k at 1 / k_max = 0.2
    assert torch.equal(agm_coefficients(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), 1.5), torch.ones(2))


def test_agm_running_mean_over_all_steps_and_epochs() -> None:
    model, batch = make()
    balancer = build_balancer("agm", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scores = []
    for epoch in range(2):
        balancer.on_epoch_start(model, epoch)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            loss, parts = balancer.compute_loss(model, batch, model(batch["inputs"]))
            assert torch.isfinite(loss) and all(v == v for v in parts.values())
            loss.backward()
            balancer.after_backward(model, None, batch)
            optimizer.step()
            scores.append([balancer.log()["score/audio"], balancer.log()["score/visual"]])
    # the plain mean since the first step, not an EMA and not reset per epoch
    assert balancer.running.tolist() == pytest.approx(torch.tensor(scores).mean(0).tolist(), rel=1e-5)
    assert balancer.steps == 4
    log = balancer.log()
    fresh = build_balancer("agm", model)
    fresh.load_state_dict(round_trip(balancer.state_dict()))
    assert torch.equal(fresh.running, balancer.running) and fresh.steps == 4 and fresh.log() == pytest.approx(log)


def test_agm_window_scales_with_the_run() -> None:
    model, batch = make(seed=3)
    # reference: epochs 1..20 of 100 modulated -> a 10-epoch run modulates epochs 0 and 1
    balancer = build_balancer("agm", model, total_epochs=10)
    assert (balancer.modulation_starts, balancer.modulation_ends) == (0, 1)
    assert build_balancer("agm", model, total_epochs=100).modulation_ends == 19
    assert build_balancer("agm", model, total_epochs=10, modulation_ends=5).modulation_ends == 5
    balancer.on_epoch_start(model, 2)
    balancer.modalities = ["audio", "visual"]
    balancer.running, balancer.steps = torch.tensor([-0.9, -1.7]), 7
    _, ref_grads, _ = _agm_reference_step(model, batch, (0.9, 1.7), alpha=1.0, modulate=False)
    model.zero_grad(set_to_none=True)
    loss, _ = balancer.compute_loss(model, batch, model(batch["inputs"]))
    loss.backward()
    assert balancer.log()["k/audio"] == 1.0 and balancer.log()["k/visual"] == 1.0
    for name, g in ref_grads.items():
        assert torch.allclose(grads(model)[name], g, rtol=1e-4, atol=1e-6), name
    assert balancer.steps == 8  # the running means still move outside the window


def test_agm_clips_when_a_fusion_gradient_leaves_unit_range() -> None:
    model, _ = make()
    balancer = build_balancer("agm", model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = grads(model)
    balancer.after_backward(model, None, {})
    assert all(torch.equal(g, before[n]) for n, g in grads(model).items())  # fusion grads within [-1, 1]
    model.fusion.fc.weight.grad[0, 0] = 3.0
    balancer.after_backward(model, None, {})
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-5)  # clip_grad_norm_(model.parameters(), 1.0)


# -- PMR -------------------------------------------------------------------------------------
def _loader(seed: int = 1, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    labels = [torch.tensor([0, 1, 1, 2]), torch.tensor([2, 0, 1, 1])] * (n // 2)  # class 3 never appears
    def inputs() -> dict:
        return {"audio": {"x": torch.randn(4, 3, generator=g)}, "visual": {"x": torch.randn(4, 4, generator=g)}}

    return [{"inputs": inputs(), "label": y, "clip_id": [f"c{i}" for i in range(4)]} for y in labels]


def _reference_prototypes(model: nn.Module, loader: list[dict], old: dict | None, momentum: float) -> dict:
    """main_Prototype_grad.py ``calculate_prototype``: len(loader) // 10 batches, class means,
    then (1 - momentum) * new + momentum * old."""
    sums = {m: torch.zeros(4, 5) for m in ("audio", "visual")}
    count = torch.zeros(4)
    with torch.no_grad():
        for step, b in enumerate(loader):
            out = model(b["inputs"])
            for c, label in enumerate(b["label"]):
                count[label] += 1
                for m in sums:
                    sums[m][label] += out.features[m][c]
            if step + 1 >= len(loader) // 10:
                break
    new = {m: s / count.clamp_min(1)[:, None] for m, s in sums.items()}
    return new if old is None else {m: (1 - momentum) * new[m] + momentum * old[m] for m in new}


def test_pmr_prototypes_match_reference() -> None:
    model, _ = make()
    loader = _loader(n=20)  # 20 batches: the reference averages the first 2
    balancer = build_balancer("pmr", model)
    balancer.on_epoch_start(model, 0, loader)
    assert model.training
    first = _reference_prototypes(model, loader, None, 0.2)
    for m in ("audio", "visual"):
        assert torch.allclose(balancer.prototypes[m][:3], first[m][:3], atol=1e-6)
        assert torch.equal(balancer.prototypes[m][3], torch.zeros(5))  # no sample: zeros before any prototype
    with torch.no_grad():  # the encoders move; the next prototypes blend with momentum 0.2
        for p in model.encoders.parameters():
            p.add_(0.3)
    balancer.on_epoch_start(model, 1, loader)
    second = _reference_prototypes(model, loader, first, 0.2)
    for m in ("audio", "visual"):
        assert torch.allclose(balancer.prototypes[m][:3], second[m][:3], atol=1e-6)
        assert torch.equal(balancer.prototypes[m][3], torch.zeros(5))  # unseen class keeps its prototype
    assert tenth_of(type("Loader", (), {"nsamples": 35})()) == 3  # a webdataset loader cut by with_epoch
    assert tenth_of(iter([])) is None  # no length: every batch
    # max_batches given: that many batches
    balancer = build_balancer("pmr", model, max_batches=1)
    balancer.on_epoch_start(model, 0, loader)
    with torch.no_grad():
        f = model(loader[0]["inputs"]).features["audio"]
    assert torch.allclose(balancer.prototypes["audio"][1], f[loader[0]["label"] == 1].mean(0), atol=1e-6)


def test_pmr_falls_back_to_ce_without_prototypes() -> None:
    model, batch = make()
    out = model(batch["inputs"])
    loss, parts = build_balancer("pmr", model).compute_loss(model, batch, out)
    assert loss.item() == pytest.approx(F.cross_entropy(out.fused, batch["label"]).item())
    assert set(parts) == {"ce_fused"}


def _eu_dist(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """main_Prototype_grad.py ``EU_dist``: sqrt of the dot product of the difference, per pair."""
    d = torch.zeros(x1.shape[0], x2.shape[0])
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d[i, j] = torch.sqrt(torch.dot(x1[i] - x2[j], x1[i] - x2[j]))
    return d


def test_pmr_step_matches_reference() -> None:
    model, batch = make()
    balancer = build_balancer("pmr", model)  # alpha 1.0, the reference's default
    with torch.no_grad():
        feats = model(batch["inputs"]).features
    y = batch["label"]
    # audio prototypes: its own class means (confident); visual: shifted by one class (weak)
    # (moved off the features a little: at distance 0 the reference's sqrt has no gradient)
    means = {m: torch.stack([feats[m][y == c].mean(0) for c in range(4)]) + 0.05 for m in feats}
    protos = {"audio": means["audio"], "visual": means["visual"].roll(1, dims=0)}
    balancer.prototypes = {m: p.clone() for m, p in protos.items()}
    out = model(batch["inputs"])
    loss, parts = balancer.compute_loss(model, batch, out)
    loss.backward()
    got = grads(model)

    # main_Prototype_grad.py train_epoch, Proto branch
    model.zero_grad(set_to_none=True)
    out = model(batch["inputs"])
    audio_sim = -_eu_dist(out.features["audio"], protos["audio"])
    visual_sim = -_eu_dist(out.features["visual"], protos["visual"])
    score_a_p = sum(torch.softmax(audio_sim, 1)[i][y[i]] for i in range(len(y)))
    score_v_p = sum(torch.softmax(visual_sim, 1)[i][y[i]] for i in range(len(y)))
    ratio_a_p = score_a_p / score_v_p
    beta, lam = (0.0, 1.0) if ratio_a_p > 1 else (1.0, 0.0) if ratio_a_p < 1 else (0.0, 0.0)
    assert lam == 1.0
    ref = F.cross_entropy(out.fused, y) + beta * F.cross_entropy(audio_sim, y) + lam * F.cross_entropy(visual_sim, y)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    log = balancer.log()
    assert log["rho/visual"] == pytest.approx(ratio_a_p.item(), rel=1e-5)
    assert log["coef/audio"] == 0 and log["coef/visual"] == 1.0
    assert parts["pce_visual"] == pytest.approx(F.cross_entropy(visual_sim, y).item(), rel=1e-5)
    for name, g in grads(model).items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name


def test_pmr_window_scales_with_the_run() -> None:
    model, batch = make()
    # reference: epochs 0..100 of 150 -> 101/150 of a 15-epoch run: epochs 0..9
    balancer = build_balancer("pmr", model, total_epochs=15)
    assert (balancer.modulation_starts, balancer.modulation_ends) == (0, 9)
    assert build_balancer("pmr", model, total_epochs=150).modulation_ends == 100
    balancer.on_epoch_start(model, 9, [batch])
    out = model(batch["inputs"])
    ce = F.cross_entropy(out.fused, batch["label"]).item()
    assert balancer.compute_loss(model, batch, out)[0].item() > ce  # inside: the prototype term
    protos = {m: p.clone() for m, p in balancer.prototypes.items()}
    balancer.on_epoch_start(model, 10, [batch])
    assert balancer.compute_loss(model, batch, out)[0].item() == pytest.approx(ce)
    assert all(torch.equal(balancer.prototypes[m], p) for m, p in protos.items())  # none computed after


def test_pmr_two_steps_and_round_trip() -> None:
    model, batch = make()
    balancer = build_balancer("pmr", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    balancer.on_epoch_start(model, 0, [batch])
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss, parts = balancer.compute_loss(model, batch, model(batch["inputs"]))
        assert torch.isfinite(loss) and all(v == v for v in parts.values())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    fresh = build_balancer("pmr", model)
    fresh.load_state_dict(round_trip(balancer.state_dict()))
    assert fresh.log() == pytest.approx(balancer.log())
    for m, p in balancer.prototypes.items():
        assert torch.equal(fresh.prototypes[m], p)
    out = model(batch["inputs"])
    assert fresh.compute_loss(model, batch, out)[0].item() == pytest.approx(
        balancer.compute_loss(model, batch, out)[0].item())
