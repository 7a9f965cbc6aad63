"""MILES (per-modality lr scales from the utilization gap) and MNL (negative learning of the weak head)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from avbalance.errors import UserError
from trainer.balancing import BALANCERS, build_balancer
from trainer.balancing.miles import miles_imbalance, utilization
from trainer.balancing.mnl import guidance
from trainer.fusion import FUSIONS
from trainer.fusion.late import LateLinear  # noqa: F401  (registers late_linear)
from trainer.optim import build_schedule
from trainer.model import MultimodalModel
from tiny_model import TinyEncoder  # the shared Linear + tanh test encoder

N_CLASSES = 4


def make(modalities=("audio", "visual"), dim: int = 5, batch_size: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    encoders = {m: TinyEncoder(3 + i, dim) for i, m in enumerate(modalities)}
    model = MultimodalModel(encoders, FUSIONS.get("late_linear")({m: dim for m in modalities}, N_CLASSES), N_CLASSES)
    batch = {
        "inputs": {m: {"x": torch.randn(batch_size, 3 + i)} for i, m in enumerate(modalities)},
        "label": torch.arange(batch_size) % N_CLASSES,
    }
    return model, batch


def _optimizer(balancer, model):
    optimizer = torch.optim.SGD(balancer.param_groups(model, 0.1), lr=0.1)
    balancer.attach_optimizer(optimizer)
    return optimizer


def _scales(optimizer):
    return {g["name"]: g.get("lr_scale", 1.0) for g in optimizer.param_groups}


def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- MILES -----------------------------------------------------------------------------------
def test_miles_imbalance_by_hand() -> None:
    assert miles_imbalance({"a": 0.6, "v": 0.4}, 0.8) == pytest.approx(0.25)
    assert miles_imbalance({"a": 0.8, "v": 0.6}) == pytest.approx(0.25)        # no fused: A = max
    assert miles_imbalance({"a": 0.8, "v": 0.6}, 0.0) == pytest.approx(0.25)
    assert miles_imbalance({"a": 0.0, "v": 0.0}, None) == 0.0
    # M = 3: the spread of the utilizations u_m = (A - mean of the others) / A
    u = utilization({"a": 0.3, "v": 0.5, "t": 0.9}, 0.9)
    assert miles_imbalance({"a": 0.3, "v": 0.5, "t": 0.9}, 0.9) == pytest.approx(max(u.values()) - min(u.values()))
    assert miles_imbalance({"a": 0.3, "v": 0.5, "t": 0.9}, 0.9) == pytest.approx(0.6 / (2 * 0.9))
    with pytest.raises(ValueError):
        miles_imbalance({"a": 0.5})


def test_miles_scales_with_the_real_schedule() -> None:
    model, _ = make()
    balancer = build_balancer("miles", model)  # tau 0.1, mu 0.5, not compounding
    optimizer = _optimizer(balancer, model)
    assert [g["name"] for g in optimizer.param_groups] == ["audio", "visual", "shared"]
    schedule = build_schedule({"optim": {"schedule": "none", "warmup_steps": 0}}, optimizer, 100)
    steps = [
        # (fused acc, unimodal accs, imbalance d, scales after the epoch)
        (0.6, {"audio": 0.5, "visual": 0.5}, 0.0, {"audio": 1.0, "visual": 1.0}),
        (0.8, {"audio": 0.6, "visual": 0.4}, 0.25, {"audio": 0.5, "visual": 1.0}),   # audio dominant
        (0.8, {"audio": 0.6, "visual": 0.4}, 0.25, {"audio": 0.5, "visual": 1.0}),   # no compounding
        (0.8, {"audio": 0.5, "visual": 0.7}, 0.25, {"audio": 1.0, "visual": 0.5}),   # visual dominant
        (1.0, {"audio": 0.55, "visual": 0.5}, 0.05, {"audio": 1.0, "visual": 1.0}),  # d <= tau: restored
    ]
    for epoch, (fused, accs, d, want) in enumerate(steps):
        balancer.on_epoch_end(model, epoch, {"accuracy": fused, "unimodal_accuracy": accs})
        assert _scales(optimizer) == {**want, "shared": 1.0}
        assert balancer.log() == pytest.approx({**{f"lr_scale/{m}": v for m, v in want.items()}, "imbalance": d})
        optimizer.step()
        schedule.step()
        assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
            {"audio": 0.1 * want["audio"], "visual": 0.1 * want["visual"], "shared": 0.1}
        )
    # epochs without (complete) unimodal accuracies change nothing
    balancer.on_epoch_end(model, 5, {"accuracy": 0.3})
    balancer.on_epoch_end(model, 6, {"accuracy": 0.3, "unimodal_accuracy": {"audio": 0.9}})
    assert _scales(optimizer) == {"audio": 1.0, "visual": 1.0, "shared": 1.0}


def test_miles_default_tau_and_reset_when_every_utilization_is_negative() -> None:
    model, _ = make()
    balancer = build_balancer("miles", model)
    optimizer = _optimizer(balancer, model)
    # d = 0.15: below the reference implementation's tau 0.2, so nothing is cut
    balancer.on_epoch_end(model, 0, {"accuracy": 1.0, "unimodal_accuracy": {"audio": 0.65, "visual": 0.5}})
    assert _scales(optimizer) == {"audio": 1.0, "visual": 1.0, "shared": 1.0}
    balancer.on_epoch_end(model, 1, {"accuracy": 0.8, "unimodal_accuracy": {"audio": 0.7, "visual": 0.4}})
    assert _scales(optimizer) == {"audio": 0.5, "visual": 1.0, "shared": 1.0}
    # fused 0.35 below both unimodal accuracies: u_audio = (0.35 - 0.4) / 0.35 < 0 and
    # u_visual = (0.35 - 0.7) / 0.35 < 0 -> no modality is over-used: every rate back to the
    # base rate, as the reference implementation resets them (though d = 0.86 > tau)
    balancer.on_epoch_end(model, 2, {"accuracy": 0.35, "unimodal_accuracy": {"audio": 0.7, "visual": 0.4}})
    assert _scales(optimizer) == {"audio": 1.0, "visual": 1.0, "shared": 1.0}
    assert balancer.imbalance == pytest.approx(0.3 / 0.35) and balancer.dominant == ""
    assert utilization({"audio": 0.7, "visual": 0.4}, 0.35) == pytest.approx(
        {"audio": (0.35 - 0.4) / 0.35, "visual": (0.35 - 0.7) / 0.35})


def test_miles_compound_and_state_round_trip() -> None:
    model, _ = make()
    balancer = build_balancer("miles", model, tau=0.2, mu=0.5, compound=True, min_scale=0.2)
    optimizer = _optimizer(balancer, model)
    schedule = build_schedule({"optim": {"schedule": "none", "warmup_steps": 2}}, optimizer, 100)
    seq = [
        (0.6, {"audio": 0.6, "visual": 0.3}, {"audio": 0.5, "visual": 1.0}),    # d = 0.5
        (0.6, {"audio": 0.6, "visual": 0.3}, {"audio": 0.25, "visual": 1.0}),
        (0.6, {"audio": 0.6, "visual": 0.3}, {"audio": 0.2, "visual": 1.0}),    # floor at min_scale
        (0.5, {"audio": 0.5, "visual": 0.45}, {"audio": 0.4, "visual": 1.0}),   # d = 0.1: back up by 1/mu
        (0.5, {"audio": 0.5, "visual": 0.6}, {"audio": 0.8, "visual": 1.0}),    # d = 0.2, not > tau: restore
    ]
    for epoch, (fused, accs, want) in enumerate(seq):
        balancer.on_epoch_end(model, epoch, {"accuracy": fused, "unimodal_accuracy": accs})
        assert _scales(optimizer) == pytest.approx({**want, "shared": 1.0})
    # the warm-up factor and lr_scale multiply
    optimizer.step()
    schedule.step()  # step 1 of warmup 2: factor 1.0
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"audio": 0.1 * 0.8, "visual": 0.1, "shared": 0.1}
    )

    fresh = build_balancer("miles", model, tau=0.2, mu=0.5, compound=True, min_scale=0.2)
    optimizer2 = _optimizer(fresh, model)
    fresh.load_state_dict(_round_trip(balancer.state_dict()))
    assert fresh.scale == pytest.approx(balancer.scale) and fresh.imbalance == pytest.approx(balancer.imbalance)
    assert fresh.log() == pytest.approx(balancer.log())
    assert _scales(optimizer2) == pytest.approx({"audio": 0.8, "visual": 1.0, "shared": 1.0})


def test_miles_three_modalities_and_options() -> None:
    model, _ = make(("audio", "visual", "text"))
    balancer = build_balancer("miles", model)
    optimizer = _optimizer(balancer, model)
    # d = (0.7 - 0.4) / (2 * 0.8) = 0.1875: under tau 0.2 once divided by M - 1 = 2 (the
    # reference's spread of u_m), so nothing is cut; a wider gap is
    balancer.on_epoch_end(model, 0, {"accuracy": 0.8, "unimodal_accuracy": {"audio": 0.4, "visual": 0.7, "text": 0.5}})
    assert _scales(optimizer) == {"audio": 1.0, "visual": 1.0, "text": 1.0, "shared": 1.0}
    assert balancer.imbalance == pytest.approx(0.1875)
    balancer.on_epoch_end(model, 1, {"accuracy": 0.8, "unimodal_accuracy": {"audio": 0.3, "visual": 0.7, "text": 0.5}})
    assert _scales(optimizer) == {"audio": 1.0, "visual": 0.5, "text": 1.0, "shared": 1.0}
    assert balancer.dominant == "visual"
    out = model({m: {"x": torch.randn(2, 3 + i)} for i, m in enumerate(model.modalities)})
    _, parts = balancer.compute_loss(model, {"label": torch.tensor([0, 1])}, out)
    assert set(parts) == {"ce_fused", "ce_audio", "ce_visual", "ce_text"}
    for bad in ({"tau": -0.1}, {"mu": 0.0}, {"mu": 1.5}, {"min_scale": 0.0}):
        with pytest.raises(UserError):
            build_balancer("miles", model, **bad)


# -- MNL -------------------------------------------------------------------------------------
def _reference_mnl(out, tgt: torch.Tensor, weight1: float) -> torch.Tensor:
    """BaoquanGong/Multimodal-Negative-Learning train_latefusion.py ``model_forward`` (train),
    with txt = audio and img = visual."""
    F = torch.nn.functional
    txt_logits, img_logits = out.unimodal["audio"], out.unimodal["visual"]
    label = F.one_hot(tgt, num_classes=N_CLASSES)
    prob_out = F.softmax(out.fused, dim=1)
    prob_out_masked = prob_out.clone()
    prob_out_masked[torch.arange(prob_out.size(0)), tgt] = -1
    _, j_idx = prob_out_masked.max(dim=1)
    rows = torch.arange(len(tgt))
    xi_t = txt_logits[rows, tgt] - txt_logits[rows, j_idx]
    xi_v = img_logits[rows, tgt] - img_logits[rows, j_idx]
    label_probs_txt = F.softmax(txt_logits, dim=1)[rows, tgt]
    label_probs_v = F.softmax(img_logits, dim=1)[rows, tgt]
    loss = (F.cross_entropy(txt_logits, tgt) + F.cross_entropy(img_logits, tgt) + F.cross_entropy(out.fused, tgt))
    valid_mask = (xi_t > xi_v) & (label_probs_txt > label_probs_v)
    if valid_mask.any():
        valid_mask = valid_mask.float().unsqueeze(1)
        boosting_loss = -(label * img_logits.log_softmax(1) * valid_mask) \
            - weight1 * (txt_logits.detach().softmax(1) * img_logits.log_softmax(1) * valid_mask) \
            + weight1 * (label * txt_logits.detach().softmax(1) * img_logits.log_softmax(1) * valid_mask)
        loss = loss + torch.mean(boosting_loss)
    valid_mask = (xi_t <= xi_v) & (label_probs_txt <= label_probs_v)
    if valid_mask.any():
        valid_mask = valid_mask.float().unsqueeze(1)
        boosting_loss = -(label * txt_logits.log_softmax(1) * valid_mask) \
            - weight1 * (img_logits.detach().softmax(1) * txt_logits.log_softmax(1) * valid_mask) \
            + weight1 * (label * img_logits.detach().softmax(1) * txt_logits.log_softmax(1) * valid_mask)
        loss = loss + torch.mean(boosting_loss)
    return loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mnl_step_matches_reference(seed: int) -> None:
    model, batch = make(batch_size=16, seed=seed)
    label = batch["label"]
    out = model(batch["inputs"])
    ref = _reference_mnl(out, label, 0.7)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    balancer = build_balancer("mnl", model)  # lam 0.7, the reference's weight1
    out = model(batch["inputs"])
    loss, parts = balancer.compute_loss(model, batch, out)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-6), n
    log = balancer.log()
    assert 0 < log["weak/audio"] + log["weak/visual"] <= 1  # per sample: some guided, never both ways
    assert parts["nl_audio"] > 0 or parts["nl_visual"] > 0


def test_mnl_guidance_per_sample_and_three_modalities() -> None:
    label = torch.tensor([0, 0])
    fused = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0]])  # wrong class j = 1, then 2
    unimodal = {
        "audio": torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),   # margins 3, -1
        "visual": torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]),  # margins 1, 2
        "text": torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),    # margins -1, 1
    }
    dom, guided = guidance(fused, unimodal, label, ["audio", "visual", "text"])
    assert dom.tolist() == [0, 1]  # the largest margin per sample
    assert guided.tolist() == [[False, True], [True, False], [True, True]]
    model, batch = make(("audio", "visual", "text"))
    balancer = build_balancer("mnl", model)
    loss, parts = balancer.compute_loss(model, batch, model(batch["inputs"]))
    assert torch.isfinite(loss) and {"nl_audio", "nl_visual", "nl_text"} <= set(parts)
    with pytest.raises(UserError):
        build_balancer("mnl", model, lam=-1.0)


def test_mnl_validation_loss_is_multiloss() -> None:
    model, batch = make(batch_size=16)
    balancer = build_balancer("mnl", model)
    balancer.compute_loss(model, batch, model(batch["inputs"]))
    before = balancer.log()
    model.eval()
    out = model(batch["inputs"])
    loss, parts = balancer.compute_loss(model, batch, out)
    ce = sum(torch.nn.functional.cross_entropy(x, batch["label"]) for x in (out.fused, *out.unimodal.values()))
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)
    assert set(parts) == {"ce_fused", "ce_audio", "ce_visual"} and balancer.log() == before


# -- both: two optimizer steps, state round trip ---------------------------------------------
@pytest.mark.parametrize("name", ["miles", "mnl"])
def test_two_steps_without_nan(name: str) -> None:
    assert name in BALANCERS.names()
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
    log = balancer.log()
    assert log and all(isinstance(v, float) and v == v for v in log.values())
    fresh = build_balancer(name, model)
    fresh.load_state_dict(_round_trip(balancer.state_dict()))
    assert fresh.log() == pytest.approx(log)
