"""MMPareto and CGGM on a tiny real ``MultimodalModel`` (CPU, no data)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avbalance.errors import UserError
from trainer.balancing import BALANCERS, build_balancer
from trainer.balancing.cggm import cggm_coefficients
from trainer.balancing.mmpareto import pareto_alpha

from tiny_model import MODS, make  # the shared tiny model and batch


def step_grads(model, balancer, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["inputs"])
    loss, parts = balancer.compute_loss(model, batch, out)
    loss.backward()
    balancer.after_backward(model, out, batch)
    return loss, parts


def raw_grads(model, batch):
    """Per encoder: (g_mm, g_uni) lists; and the total-loss .grad of every parameter."""
    model.zero_grad(set_to_none=True)
    out = model(batch["inputs"])
    ce_f = F.cross_entropy(out.fused, batch["label"])
    ces = {m: F.cross_entropy(out.unimodal[m], batch["label"]) for m in MODS}
    per = {}
    for m in MODS:
        ps = list(model.encoders[m].parameters())
        g_mm = torch.autograd.grad(ce_f, ps, retain_graph=True)
        g_uni = torch.autograd.grad(ces[m], ps, retain_graph=True)
        per[m] = ([g.numpy().astype(np.float64) for g in g_mm], [g.numpy().astype(np.float64) for g in g_uni])
    (ce_f + sum(ces.values())).backward()
    total = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return per, total


def numpy_mmpareto(g_mm, g_uni, gamma=1.0):
    a = np.concatenate([g.ravel() for g in g_mm])
    b = np.concatenate([g.ravel() for g in g_uni])
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    alpha = 0.5 if cos >= 0 else float(np.clip((b - a) @ b / ((a - b) @ (a - b)), 0, 1))
    out = []
    for gm, gu in zip(g_mm, g_uni):
        new = 2 * alpha * gm + 2 * (1 - alpha) * gu
        ratio = np.linalg.norm(gm + gu) / np.linalg.norm(new)
        out.append(new * max(1.0, ratio) * gamma)
    return cos, alpha, out


def conflicting_model():
    """Head of audio = minus the fusion's audio slice: the two losses pull encoder audio apart."""
    for seed in range(50):
        model, batch = make(seed)
        with torch.no_grad():
            w = model.fusion.weight_slices()["audio"]
            model.heads["audio"].weight.copy_(-w)
            model.heads["audio"].bias.zero_()
        per, _ = raw_grads(model, batch)
        a = np.concatenate([g.ravel() for g in per["audio"][0]])
        b = np.concatenate([g.ravel() for g in per["audio"][1]])
        if a @ b < 0:
            return model, batch
    raise AssertionError("no conflicting seed found")


# -- MMPareto ------------------------------------------------------------------------------
def test_registered() -> None:
    assert "mmpareto" in BALANCERS.names() and "cggm" in BALANCERS.names()


def test_pareto_alpha_closed_form() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # cos < 0
    cos, alpha = pareto_alpha(a, b)
    # alpha = (b - a).b / |a - b|^2 = (-2, 1).(-1, 1) / 5 = 3 / 5
    assert cos == pytest.approx(-1 / math.sqrt(2)) and alpha == pytest.approx(0.6)
    # min-norm point: 0.6 a + 0.4 b = (0.2, 0.4), orthogonal to a - b
    p = alpha * a + (1 - alpha) * b
    assert float(p @ (a - b)) == pytest.approx(0.0, abs=1e-6)
    assert pareto_alpha(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))[1] == 0.5
    # unequal norms: a = (-1, 0), b = (10, 10): alpha = (11, 10).(10, 10) / 221 = 210 / 221
    assert pareto_alpha(torch.tensor([-1.0, 0.0]), torch.tensor([10.0, 10.0]))[1] == pytest.approx(210 / 221)


def test_mmpareto_conflict_matches_numpy_and_counts_backwards(monkeypatch) -> None:
    model, batch = conflicting_model()
    per, total = raw_grads(model, batch)
    bal = build_balancer("mmpareto", model)
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    step_grads(model, bal, batch)
    assert len(calls) == len(MODS) + 1 == bal.extra_backwards
    cos, alpha, expected = numpy_mmpareto(*per["audio"])
    assert cos < 0 and 0 < alpha < 1
    log = bal.log()
    assert log["conflict/audio"] == 1.0 and log["cos/audio"] == pytest.approx(cos, rel=1e-4)
    assert log["alpha/audio"] == pytest.approx(alpha, rel=1e-4)
    for p, e in zip(model.encoders["audio"].parameters(), expected):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=1e-4, atol=1e-7)
    # magnitude restored to at least the summed gradient's
    for p, (gm, gu) in zip(model.encoders["audio"].parameters(), zip(*per["audio"])):
        assert p.grad.norm().item() >= np.linalg.norm(gm + gu) * (1 - 1e-5)
    # heads and fusion: ordinary gradients of the total loss
    for name, p in model.named_parameters():
        if not name.startswith("encoders."):
            torch.testing.assert_close(p.grad, total[name])


def test_mmpareto_agreeing_case_is_the_sum() -> None:
    for seed in range(50):
        model, batch = make(seed)
        per, total = raw_grads(model, batch)
        a = np.concatenate([g.ravel() for g in per["visual"][0]])
        b = np.concatenate([g.ravel() for g in per["visual"][1]])
        if a @ b > 0:
            break
    else:
        raise AssertionError("no agreeing seed")
    bal = build_balancer("mmpareto", model)
    step_grads(model, bal, batch)
    assert bal.log()["conflict/visual"] == 0.0 and bal.log()["alpha/visual"] == 0.5
    for (name, p), gm, gu in zip(model.encoders["visual"].named_parameters(), *per["visual"]):
        np.testing.assert_allclose(p.grad.numpy(), gm + gu, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.grad, total[f"encoders.visual.{name}"])
    # gamma multiplies the result (reference code: 1.5)
    bal15 = build_balancer("mmpareto", model, gamma=1.5)
    step_grads(model, bal15, batch)
    for p, gm, gu in zip(model.encoders["visual"].parameters(), *per["visual"]):
        np.testing.assert_allclose(p.grad.numpy(), 1.5 * (gm + gu), rtol=1e-5, atol=1e-7)


def test_mmpareto_eval_mode_no_extra_backward() -> None:
    model, batch = make()
    bal = build_balancer("mmpareto", model)
    model.eval()
    with torch.no_grad():
        loss, parts = bal.compute_loss(model, batch, model(batch["inputs"]))
    assert set(parts) == {"ce_fused", "ce_audio", "ce_visual"} and bal._pending == {}
    bal.after_backward(model, None, batch)  # nothing pending: no-op
    with pytest.raises(UserError):
        build_balancer("mmpareto", model, gamma=0)


# -- CGGM ----------------------------------------------------------------------------------
def test_cggm_coefficients_by_hand() -> None:
    # d = [0.1, 0.3], S = 0.4: B = [(0.4 - 0.1) / 0.4, (0.4 - 0.3) / 0.4] = [0.75, 0.25]
    assert cggm_coefficients([0.6, 0.5], [0.5, 0.2]) == pytest.approx([0.75, 0.25], rel=1e-6)
    # no change at all: S = eps, B = eps / eps = 1
    assert cggm_coefficients([0.5, 0.5], [0.5, 0.5]) == pytest.approx([1.0, 1.0])
    # three modalities d = [0.2, 0.1, -0.1], S = 0.2: B = [0, 0.5, 1.5]
    assert cggm_coefficients([0.7, 0.6, 0.3], [0.5, 0.5, 0.4]) == pytest.approx([0.0, 0.5, 1.5], abs=1e-6)
    # S ~ 0 with opposite changes: reference explodes, max_coeff clamps
    # d = [0.5, -0.5], S = 1e-8: B = [(S - 0.5) / S, (S + 0.5) / S] ~ [-5e7, 5e7] -> [-10, 10]
    assert cggm_coefficients([0.5, 0.0], [0.0, 0.5]) == pytest.approx([-10.0, 10.0])
    raw = cggm_coefficients([0.5, 0.0], [0.0, 0.5], max_coeff=None)
    assert abs(raw[0]) > 1e6


def test_cggm_step_coefficients_history_and_state_roundtrip() -> None:
    model, batch = make(seed=1)
    bal = build_balancer("cggm", model)
    assert (bal.rho, bal.lam) == (1.3, 0.2)
    # scores history: pretend the previous step's accuracies were known
    bal.prev_acc = {"audio": 0.0, "visual": 0.5}
    out = model(batch["inputs"])
    label = batch["label"]
    acc = [float((out.unimodal[m].argmax(-1) == label).float().mean()) for m in MODS]
    d = [acc[0] - 0.0, acc[1] - 0.5]
    s = sum(d) + 1e-8
    expected_b = [min(max((s - x) / s, -10.0), 10.0) for x in d]
    # reference gradients (no modulation) for the encoders
    ref = build_balancer("cggm", model)
    ref.prev_acc = dict(bal.prev_acc)
    model.zero_grad(set_to_none=True)
    loss_r, _ = ref.compute_loss(model, batch, model(batch["inputs"]))
    loss_r.backward()
    enc_ref = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("encoders.")}
    loss, parts = step_grads(model, bal, batch)
    log = bal.log()
    for i, m in enumerate(MODS):
        assert log[f"B/{m}"] == pytest.approx(expected_b[i], rel=1e-6)
        assert log[f"k/{m}"] == pytest.approx(1.3 * expected_b[i], rel=1e-6)
        assert bal.prev_acc[m] == pytest.approx(acc[i])
    for n, p in model.named_parameters():
        if n.startswith("encoders."):
            m = n.split(".")[1]
            torch.testing.assert_close(p.grad, enc_ref[n] * 1.3 * expected_b[MODS.index(m)])
    # probe heads do not reach the encoders: encoder grads come from CE(fused) only
    assert {"ce_fused", "ce_audio", "ce_visual", "l_gm"} <= set(parts)
    assert math.isfinite(parts["l_gm"])
    # state round-trip through torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(bal.state_dict(), buf)
    buf.seek(0)
    fresh = build_balancer("cggm", model)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.prev_acc == bal.prev_acc and fresh.step == bal.step == 1 and fresh.log() == bal.log()


def test_cggm_direction_term_trains_the_fusion_only() -> None:
    """zrguo/CGGM src/msatrain.py: ``cls_optimizer.zero_grad()`` follows ``raw_loss.backward()``,
    so lamda * l_gm updates the fusion (its out_layer) and nothing else."""
    model, batch = make(seed=2)
    got = {}
    for lam in (0.0, 1.0):
        bal = build_balancer("cggm", model, lam=lam)
        model.zero_grad(set_to_none=True)
        loss, parts = bal.compute_loss(model, batch, model(batch["inputs"]))
        loss.backward()  # no after_backward: raw gradients
        got[lam] = {n: p.grad.clone() for n, p in model.named_parameters()}
    changed = [n for n in got[0.0] if not torch.allclose(got[0.0][n], got[1.0][n])]
    assert changed and all(n.startswith("fusion.") for n in changed)
    assert 0.0 <= parts["l_gm"] <= 2 * 10.0 + 1e-6

    # the fusion's extra gradient is dL_gm/dtheta_F with the heads' feature gradients constant
    label = batch["label"]
    with torch.no_grad():
        out = model(batch["inputs"])
    z = {m: out.features[m].clone().requires_grad_(True) for m in MODS}
    g_f = torch.autograd.grad(F.cross_entropy(model.fusion(z), label), [z[m] for m in MODS], create_graph=True)
    b = torch.tensor([bal.log()[f"B/{m}"] for m in MODS])
    cos = []
    for i, m in enumerate(MODS):
        zm = out.features[m].clone().requires_grad_(True)
        (g_m,) = torch.autograd.grad(F.cross_entropy(model.heads[m](zm), label), [zm])
        cos.append(F.cosine_similarity(g_f[i].reshape(-1), g_m.reshape(-1), dim=0))
    l_gm = (b.abs().sum() - (b * torch.stack(cos)).sum()) / len(MODS)
    fusion = dict(model.fusion.named_parameters())
    want = torch.autograd.grad(l_gm, list(fusion.values()))
    for (n, _), w in zip(fusion.items(), want):
        torch.testing.assert_close(got[1.0][f"fusion.{n}"] - got[0.0][f"fusion.{n}"], w, rtol=1e-4, atol=1e-6)


def test_cggm_heads_get_their_own_rate() -> None:
    model, _ = make()
    groups = build_balancer("cggm", model).param_groups(model, 1e-3)
    assert [g["name"] for g in groups] == ["model", "heads"]
    heads = groups[1]
    # reference: cls_optimizer = Adam(classifier.parameters(), lr=cls_lr 5e-4) next to lr 1e-3
    assert heads["lr"] == pytest.approx(5e-4) and heads["weight_decay"] == 0.0
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.heads.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert build_balancer("cggm", model, cls_lr=2e-3).param_groups(model, 1e-3)[1]["lr"] == 2e-3
    with pytest.raises(UserError, match="cls_lr"):
        build_balancer("cggm", model, cls_lr=0.0)


@pytest.mark.parametrize("name", ["mmpareto", "cggm"])
def test_two_optimizer_steps_no_nan(name) -> None:
    model, batch = make(seed=3)
    bal = build_balancer(name, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss, _ = step_grads(model, bal, batch)
        assert torch.isfinite(loss)
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(math.isfinite(v) for v in bal.log().values())
