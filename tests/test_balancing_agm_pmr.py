"""AGM and PMR on the tiny stand-in model of test_balancing (CPU, no data)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_balancing import TinyLate, TinyMLP, grads, make
from trainer.balancing import BALANCERS, build_balancer
from trainer.balancing.agm import agm_coefficients, coalition_values, shapley_logits


class Counting(nn.Module):
    """A DDP-like wrapper (``.module``) that counts forward calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls: list[frozenset] = []

    def forward(self, inputs: Any, drop: Any = frozenset()) -> Any:
        self.calls.append(frozenset(drop))
        return self.module(inputs, drop=drop)


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
    wrapped = Counting(model)
    balancer = build_balancer("agm", model)
    out = wrapped(batch["inputs"])
    wrapped.calls.clear()
    balancer.compute_loss(wrapped, batch, out)
    # every proper subset of modalities kept: 2^M - 1 extra forwards (3 for M = 2)
    assert len(wrapped.calls) == 2 ** len(modalities) - 1
    assert set(wrapped.calls) == {frozenset(s) for s in _proper_drops(modalities)}
    assert model.training  # mode restored after the eval-mode extra forwards
    # not training: no extra forwards, no state change
    model.eval()
    wrapped.calls.clear()
    before = balancer.running.clone()
    balancer.compute_loss(wrapped, batch, model(batch["inputs"]))
    assert wrapped.calls == [] and torch.equal(balancer.running, before)


def _proper_drops(modalities: tuple[str, ...]) -> list[set]:
    n = len(modalities)
    return [{m for i, m in enumerate(modalities) if mask >> i & 1} for mask in range(1, 2 ** n)]


@pytest.mark.parametrize("modalities", [("audio", "visual"), ("audio", "visual", "text")])
def test_agm_shapley_efficiency(modalities: tuple[str, ...]) -> None:
    model, batch = make(modalities, fusion=TinyMLP)
    with torch.no_grad():
        full = model(batch["inputs"]).fused
        values = coalition_values(model, batch["inputs"], list(modalities), full)
        phi = shapley_logits(values, list(modalities))
    total = sum(phi.values()) + values[frozenset()]
    assert torch.allclose(total, full, atol=1e-5)
    if len(modalities) == 2:
        a, v = (frozenset({m}) for m in modalities)
        by_hand = 0.5 * (values[a | v] - values[v] + values[a] - values[frozenset()])
        assert torch.allclose(phi["audio"], by_hand, atol=1e-6)


def test_agm_running_means_change_and_round_trip() -> None:
    model, batch = make()
    balancer = build_balancer("agm", model, momentum=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = model(batch["inputs"])
        loss, parts = balancer.compute_loss(model, batch, out)
        assert torch.isfinite(loss) and all(v == v for v in parts.values())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        history.append(balancer.running.clone())
    assert not torch.equal(history[0], history[1])
    log = balancer.log()
    assert {"k/audio", "k/visual", "score/audio", "score/visual"} <= set(log)
    fresh = build_balancer("agm", model)
    fresh.load_state_dict(round_trip(balancer.state_dict()))
    assert torch.equal(fresh.running, balancer.running) and fresh.log() == pytest.approx(log)


def test_agm_coefficients_direction_and_clip() -> None:
    # audio now stronger than its running relative strength -> damped; visual boosted
    k = agm_coefficients(torch.tensor([-0.5, -1.5]), torch.tensor([-1.0, -1.0]), alpha=1.5, k_max=5.0)
    assert k[0] < 1 < k[1]
    assert torch.equal(agm_coefficients(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), 1.5, 5.0),
                       torch.ones(2))
    k = agm_coefficients(torch.tensor([0.0, -30.0]), torch.tensor([-30.0, 0.0]), alpha=1.5, k_max=5.0)
    assert k.tolist() == pytest.approx([0.2, 5.0])


@pytest.mark.parametrize("fusion", [TinyLate, TinyMLP])
def test_agm_scales_encoder_gradients(fusion: type) -> None:
    model, batch = make(fusion=fusion)
    out = model(batch["inputs"])
    F.cross_entropy(out.fused, batch["label"]).backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)

    balancer = build_balancer("agm", model)
    balancer.modalities = ["audio", "visual"]
    balancer.running = torch.tensor([-3.0, 0.0])  # audio far behind by history -> its k differs from 1
    out = model(batch["inputs"])
    loss, _ = balancer.compute_loss(model, batch, out)
    loss.backward()
    log = balancer.log()
    k = {m: log[f"k/{m}"] for m in ("audio", "visual")}
    assert k["audio"] != pytest.approx(1.0) and k["visual"] != pytest.approx(1.0)
    for name, g in grads(model).items():
        if name.startswith("encoders."):
            m = name.split(".")[1]
            assert torch.allclose(g, k[m] * plain[name], rtol=1e-5, atol=1e-7), name
        else:  # the fusion is not modulated
            assert torch.allclose(g, plain[name], rtol=1e-5, atol=1e-7), name


# -- PMR -------------------------------------------------------------------------------------
def _loader(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    labels = [torch.tensor([0, 1, 1, 2]), torch.tensor([2, 0, 1, 1])]  # class 3 never appears
    def inputs() -> dict:
        return {"audio": {"x": torch.randn(4, 3, generator=g)}, "visual": {"x": torch.randn(4, 4, generator=g)}}

    return [{"inputs": inputs(), "label": y, "clip_id": [f"c{i}" for i in range(4)]} for y in labels]


def test_pmr_prototypes_are_class_means() -> None:
    model, _ = make()
    loader = _loader()
    balancer = build_balancer("pmr", model)
    balancer.on_epoch_start(model, 0, loader)
    assert model.training
    with torch.no_grad():
        outs = [model(b["inputs"]) for b in loader]
    labels = torch.cat([b["label"] for b in loader])
    for m in ("audio", "visual"):
        feats = torch.cat([o.features[m] for o in outs])
        protos = balancer.prototypes[m]
        assert protos.shape == (4, 5)
        for c in range(3):
            assert torch.allclose(protos[c], feats[labels == c].mean(0), atol=1e-6)
        assert torch.equal(protos[3], torch.zeros(5))  # no sample: zeros before any prototype
    # max_batches = 1: only the first batch; a class missing there keeps the previous prototype
    previous = {m: p.clone() for m, p in balancer.prototypes.items()}
    balancer.max_batches = 1
    balancer.on_epoch_start(model, 1, [loader[0], loader[1]])
    with torch.no_grad():
        first = model(loader[0]["inputs"]).features["audio"]
    y0 = loader[0]["label"]
    assert torch.allclose(balancer.prototypes["audio"][1], first[y0 == 1].mean(0), atol=1e-6)
    assert torch.equal(balancer.prototypes["audio"][3], previous["audio"][3])


def test_pmr_falls_back_to_ce_without_prototypes() -> None:
    model, batch = make()
    out = model(batch["inputs"])
    loss, parts = build_balancer("pmr", model).compute_loss(model, batch, out)
    assert loss.item() == pytest.approx(F.cross_entropy(out.fused, batch["label"]).item())
    assert set(parts) == {"ce_fused"}


def test_pmr_term_goes_to_the_weaker_modality() -> None:
    model, batch = make()
    balancer = build_balancer("pmr", model, alpha=2.0)
    with torch.no_grad():
        feats = model(batch["inputs"]).features
    y = batch["label"]
    # audio prototypes: its own class means (confident); visual: class means shifted by one
    # class (each class's prototype is another class's mean: low confidence)
    means = {m: torch.stack([feats[m][y == c].mean(0) for c in range(4)]) for m in feats}
    balancer.prototypes = {"audio": means["audio"], "visual": means["visual"].roll(1, dims=0)}
    out = model(batch["inputs"])
    loss, parts = balancer.compute_loss(model, batch, out)
    log = balancer.log()
    assert log["conf/audio"] > log["conf/visual"]
    rho_v = log["conf/audio"] / log["conf/visual"]
    assert log["rho/visual"] == pytest.approx(rho_v, rel=1e-5) and log["rho/audio"] < 1
    assert log["coef/audio"] == 0 and log["coef/visual"] == pytest.approx(min(2.0 * (rho_v - 1), 10.0), rel=1e-5)
    dist2 = ((out.features["visual"][:, None, :] - balancer.prototypes["visual"][None]) ** 2).sum(-1)  # (6, 4)
    pce_v = F.cross_entropy(-dist2, y)
    by_hand = F.cross_entropy(out.fused, y) + log["coef/visual"] * pce_v
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert {"pce/audio", "pce/visual", "rho/audio", "rho/visual"} <= set(log)

    # gradients: the audio encoder sees only CE(fused); the visual one also the PCE term
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch["inputs"]).fused, y).backward()
    plain = grads(model)
    assert torch.allclose(got["encoders.audio.proj.weight"], plain["encoders.audio.proj.weight"], atol=1e-7)
    assert not torch.allclose(got["encoders.visual.proj.weight"], plain["encoders.visual.proj.weight"])


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
