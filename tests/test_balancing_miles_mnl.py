"""MILES (per-modality lr scales from the utilization gap) and MNL (negative learning of the weak head)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from avbalance.errors import UserError
from trainer.balancing import BALANCERS, build_balancer
from trainer.balancing.miles import miles_imbalance
from trainer.balancing.mnl import negative_learning_loss, true_class_confidence
from trainer.fusion import FUSIONS
from trainer.fusion.late import LateLinear  # noqa: F401  (registers late_linear)
from trainer.loop import build_schedule
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
    assert miles_imbalance({"a": 0.3, "v": 0.5, "t": 0.9}, 0.9) == pytest.approx(0.6 / 0.9)
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
    balancer.on_epoch_end(model, 0, {"accuracy": 0.8, "unimodal_accuracy": {"audio": 0.4, "visual": 0.7, "text": 0.5}})
    assert _scales(optimizer) == {"audio": 1.0, "visual": 0.5, "text": 1.0, "shared": 1.0}
    assert balancer.dominant == "visual"
    out = model({m: {"x": torch.randn(2, 3 + i)} for i, m in enumerate(model.modalities)})
    _, parts = balancer.compute_loss(model, {"label": torch.tensor([0, 1])}, out)
    assert set(parts) == {"ce_fused", "ce_audio", "ce_visual", "ce_text"}
    for bad in ({"tau": -0.1}, {"mu": 0.0}, {"mu": 1.5}, {"min_scale": 0.0}):
        with pytest.raises(UserError):
            build_balancer("miles", model, **bad)


# -- MNL -------------------------------------------------------------------------------------
def test_negative_learning_loss_by_hand() -> None:
    weak = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    dom = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    label = torch.tensor([0, 2])

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for b, y in enumerate(label.tolist()):
        p = softmax(weak[b].tolist())
        total += sum(dom[b, c].item() * -math.log(1 - p[c]) for c in range(3) if c != y)
    want = total / 2
    assert negative_learning_loss(weak, dom, label).item() == pytest.approx(want, rel=1e-6)
    # classes the dominant modality rules out (q = 0) contribute nothing
    dom_zero = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert negative_learning_loss(weak, dom_zero, label).item() == 0.0


def _weak_and_dominant(model, batch):
    out = model(batch["inputs"])
    s = true_class_confidence(out, batch["label"], model.modalities).tolist()
    weak, dominant = (model.modalities[0], model.modalities[1]) if s[0] < s[1] else (model.modalities[1], model.modalities[0])
    return out, weak, dominant


def test_mnl_loss_applies_only_to_the_weak_modality() -> None:
    model, batch = make()
    balancer = build_balancer("mnl", model, lam=0.5)
    out, weak, dominant = _weak_and_dominant(model, batch)
    loss, parts = balancer.compute_loss(model, batch, out)
    label = batch["label"]
    q = out.unimodal[dominant].detach().softmax(-1)
    p = out.unimodal[weak].detach().softmax(-1)
    by_hand = 0.0
    for b, y in enumerate(label.tolist()):
        by_hand += sum(q[b, c].item() * -math.log(1 - p[b, c].item()) for c in range(N_CLASSES) if c != y)
    by_hand = 0.5 * by_hand / len(label)
    assert parts[f"nl_{weak}"] == pytest.approx(by_hand, rel=1e-5)
    assert parts[f"nl_{dominant}"] == 0.0
    ce = parts["ce_fused"] + parts["ce_audio"] + parts["ce_visual"]
    assert loss.item() == pytest.approx(ce + by_hand, rel=1e-5)
    assert balancer.log() == pytest.approx(
        {f"nl/{weak}": by_hand, f"nl/{dominant}": 0.0, f"weak/{weak}": 1.0, f"weak/{dominant}": 0.0}
    )
    # eval-mode calls leave the logged values alone
    model.eval()
    before = balancer.log()
    balancer.compute_loss(model, {"label": label.flip(0)}, out)
    assert balancer.log() == before


def test_mnl_does_not_touch_the_dominant_gradients() -> None:
    model, batch = make()
    _, weak, dominant = _weak_and_dominant(model, batch)
    grads = {}
    for name in ("multiloss", "mnl"):
        model.zero_grad(set_to_none=True)
        out = model(batch["inputs"])
        loss, _ = build_balancer(name, model).compute_loss(model, batch, out)
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in grads["mnl"]:
        same = torch.allclose(grads["mnl"][n], grads["multiloss"][n], atol=1e-7)
        if n.startswith((f"encoders.{dominant}.", f"heads.{dominant}.", "fusion.")):
            assert same, n
        elif n.startswith(f"heads.{weak}."):
            assert not same, n
    # lam = 0 gives multiloss exactly
    model.zero_grad(set_to_none=True)
    out = model(batch["inputs"])
    loss, _ = build_balancer("mnl", model, lam=0.0).compute_loss(model, batch, out)
    loss.backward()
    assert all(torch.allclose(p.grad, grads["multiloss"][n]) for n, p in model.named_parameters())


def test_mnl_three_modalities_and_options() -> None:
    model, batch = make(("audio", "visual", "text"))
    balancer = build_balancer("mnl", model)
    out = model(batch["inputs"])
    s = true_class_confidence(out, batch["label"], model.modalities).tolist()
    _, parts = balancer.compute_loss(model, batch, out)
    top = max(range(3), key=lambda i: s[i])
    for i, m in enumerate(model.modalities):
        assert balancer.log()[f"weak/{m}"] == (0.0 if i == top else 1.0)
        assert (parts[f"nl_{m}"] > 0) == (i != top)
    with pytest.raises(UserError):
        build_balancer("mnl", model, lam=-1.0)


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
