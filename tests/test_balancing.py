"""Balancing methods on a tiny stand-in model (CPU, no data): losses, MLB coefficients and gradients."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Collection, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from trainer.balancing import BALANCERS, Balancer, build_balancer, mlb_coefficients, mlb_ratios
from trainer.balancing.base import modality_param_groups
from tiny_model import TinyEncoder  # the shared Linear + tanh test encoder

N_CLASSES = 4


# -- a stand-in with the interface of trainer.model.MultimodalModel ------------------------
@dataclass
class Out:
    fused: torch.Tensor
    unimodal: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]


class TinyLate(nn.Module):
    """Concatenate, one Linear: decomposable."""

    decomposable = True

    def __init__(self, dims: Mapping[str, int], n_classes: int) -> None:
        super().__init__()
        self.modalities, self.dims = list(dims), dict(dims)
        self.fc = nn.Linear(sum(dims.values()), n_classes)

    def per_modality_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ws = torch.split(self.fc.weight, [self.dims[m] for m in self.modalities], dim=1)
        return {m: F.linear(features[m], w) for m, w in zip(self.modalities, ws)}

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([features[m] for m in self.modalities], dim=-1))


class TinyMLP(TinyLate):
    """Not decomposable (a hidden non-linearity)."""

    decomposable = False

    def __init__(self, dims: Mapping[str, int], n_classes: int) -> None:
        super().__init__(dims, n_classes)
        self.fc = nn.Sequential(nn.Linear(sum(dims.values()), 8), nn.ReLU(), nn.Linear(8, n_classes))


class TinyModel(nn.Module):
    """Linear encoders + Linear heads + a fusion; ``inputs[m] = {"x": (B, in_dim)}``."""

    def __init__(self, in_dims: Mapping[str, int], dim: int = 5, fusion: type = TinyLate) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: TinyEncoder(d, dim) for m, d in in_dims.items()})
        self.heads = nn.ModuleDict({m: nn.Linear(dim, N_CLASSES) for m in in_dims})
        self.fusion = fusion({m: dim for m in in_dims}, N_CLASSES)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders.keys())

    def forward(self, inputs: Mapping[str, Mapping[str, torch.Tensor]], drop: Collection[str] = frozenset()) -> Out:
        b = next(iter(next(iter(inputs.values())).values())).shape[0]
        feats = {
            m: torch.zeros(b, self.encoders[m].out_dim) if m in drop else self.encoders[m](**inputs[m])
            for m in self.modalities
        }
        return Out(self.fusion(feats), {m: self.heads[m](f) for m, f in feats.items()}, feats)

    def modality_params(self) -> dict[str, list[nn.Parameter]]:
        return {m: [*self.encoders[m].parameters(), *self.heads[m].parameters()] for m in self.modalities}

    def shared_params(self) -> list[nn.Parameter]:
        return list(self.fusion.parameters())


def make(modalities: tuple[str, ...] = ("audio", "visual"), fusion: type = TinyLate, seed: int = 0):
    """A tiny model and a batch of 6 for it."""
    torch.manual_seed(seed)
    in_dims = {m: 3 + i for i, m in enumerate(modalities)}
    model = TinyModel(in_dims, fusion=fusion)
    batch = {
        "inputs": {m: {"x": torch.randn(6, d)} for m, d in in_dims.items()},
        "label": torch.tensor([0, 1, 2, 3, 1, 2]),
    }
    return model, batch


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- the MLB rule --------------------------------------------------------------------------
def test_mlb_two_modalities_by_hand() -> None:
    # s = [0.4, 0.8]: r_1 = 0.8 / 0.4 = 2.0, r_2 = 0.4 / 0.8 = 0.5.
    # k_1 = 1 + (10 - 1) tanh(0.5 * (2 - 1)) = 1 + 9 tanh(0.5) = 1 + 9 * 0.46211715726 = 5.15905441534
    # k_2 = 1 + (2 - 1) tanh(0.5 * (0.5 - 1)) = 1 + tanh(-0.25) = 1 - 0.24491866240 = 0.75508133760
    assert mlb_ratios([0.4, 0.8]).tolist() == pytest.approx([2.0, 0.5], rel=1e-6)
    k = mlb_coefficients([0.4, 0.8], alpha=0.5, beta_max=10.0)
    assert k.tolist() == pytest.approx([5.15905441534, 0.75508133760], rel=1e-6)
    # Conformer setting alpha 5, beta_max 2: k_1 = 1 + tanh(5) = 1.99990920426,
    # k_2 = 1 + tanh(5 * (0.5 - 1)) = 1 + tanh(-2.5) = 1 - 0.98661429815 = 0.01338570185
    k = mlb_coefficients(torch.tensor([0.4, 0.8]), alpha=5.0, beta_max=2.0)
    assert k.tolist() == pytest.approx([1.99990920426, 0.01338570185], rel=1e-5)


def test_mlb_equal_scores_give_one() -> None:
    for s in ([0.3, 0.3], [0.7, 0.7, 0.7], [0.0, 0.0]):
        k = mlb_coefficients(s, alpha=5.0, beta_max=10.0)
        assert torch.equal(k, torch.ones(len(s)))


def test_mlb_beta_max_cap() -> None:
    # r_1 = 1 / 1e-6 = 1e6: tanh saturates at 1, so k_1 = 1 + (beta_max - 1) = beta_max, never more.
    for beta_max in (1.0, 2.0, 10.0):
        k = mlb_coefficients([1e-6, 1.0], alpha=0.5, beta_max=beta_max)
        assert k[0].item() == pytest.approx(beta_max) and k[0].item() <= beta_max
        assert 0 < k[1].item() < 1
    # a zero score is guarded by eps: finite, capped
    k = mlb_coefficients([0.0, 0.5], alpha=0.5, beta_max=10.0)
    assert torch.isfinite(k).all() and k[0].item() == pytest.approx(10.0)
    # the slowed modality never stops: k >= 1 - tanh(alpha) > 0
    assert k[1].item() >= 1 - torch.tanh(torch.tensor(0.5)).item() - 1e-7


def test_mlb_three_modalities_by_hand() -> None:
    # s = [0.2, 0.4, 0.6]:
    # r_1 = mean(0.4, 0.6) / 0.2 = 0.5 / 0.2 = 2.5 -> k_1 = 1 + 9 tanh(0.5 * 1.5) = 1 + 9 * 0.63514895239 = 6.71634057149
    # r_2 = mean(0.2, 0.6) / 0.4 = 0.4 / 0.4 = 1.0 -> k_2 = 1
    # r_3 = mean(0.2, 0.4) / 0.6 = 0.3 / 0.6 = 0.5 -> k_3 = 1 + tanh(-0.25) = 0.75508133760
    s = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    assert mlb_ratios(s).tolist() == pytest.approx([2.5, 1.0, 0.5], rel=1e-12)
    k = mlb_coefficients(s, alpha=0.5, beta_max=10.0)
    assert k.tolist() == pytest.approx([6.71634057149, 1.0, 0.75508133760], rel=1e-10)


def test_mlb_needs_two_scores() -> None:
    with pytest.raises(ValueError):
        mlb_coefficients([0.5])


# -- MLB on a model ------------------------------------------------------------------------
@pytest.mark.parametrize("modalities", [("audio", "visual"), ("audio", "visual", "text")])
def test_mlb_step_scales_modality_gradients(modalities: tuple[str, ...]) -> None:
    model, batch = make(modalities)
    plain = BALANCERS.get("multiloss")()
    loss_plain, _ = plain.compute_loss(model, batch, model(batch["inputs"]))
    loss_plain.backward()
    g_plain = grads(model)
    model.zero_grad(set_to_none=True)

    mlb = build_balancer("mlb", model)
    out = model(batch["inputs"])
    loss, parts = mlb.compute_loss(model, batch, out)
    assert loss.item() == pytest.approx(loss_plain.item())
    loss.backward()
    mlb.after_backward(model, out, batch)
    g_mlb = grads(model)

    # expected coefficients, independently: s_m = mean_b softmax(head_m)[b, y_b]
    y = batch["label"]
    s = [out.unimodal[m].softmax(-1)[torch.arange(len(y)), y].mean().item() for m in modalities]
    expect_k = {}
    for i, m in enumerate(modalities):
        r = (sum(s) - s[i]) / (len(s) - 1) / s[i]
        beta = 10.0 if r > 1 else 2.0
        expect_k[m] = 1 + (beta - 1) * torch.tanh(torch.tensor(0.5 * (r - 1), dtype=torch.float64)).item()
        logged = mlb.log()
        assert logged[f"r/{m}"] == pytest.approx(r, rel=1e-5)
        assert logged[f"k/{m}"] == pytest.approx(expect_k[m], rel=1e-5)
        assert logged[f"s/{m}"] == pytest.approx(s[i], rel=1e-6)
    assert len({round(k, 6) for k in expect_k.values()}) > 1  # a real test: the k differ

    names = {id(p): n for n, p in model.named_parameters()}
    for m, params in model.modality_params().items():
        for p in params:
            n = names[id(p)]
            torch.testing.assert_close(g_mlb[n], expect_k[m] * g_plain[n], rtol=1e-5, atol=1e-7)
    for p in model.shared_params():
        n = names[id(p)]
        assert torch.equal(g_mlb[n], g_plain[n])


def test_mlb_rejects_bad_options_and_one_modality() -> None:
    model, _ = make()
    with pytest.raises(UserError, match="alpha"):
        build_balancer("mlb", model, alpha=0.0)
    with pytest.raises(UserError, match="beta_max"):
        build_balancer("mlb", model, beta_max=0.5)
    with pytest.raises(UserError, match="accepted"):
        build_balancer("mlb", model, gamma=1.0)
    single, _ = make(("audio",))
    with pytest.raises(UserError, match="at least 2 modalities"):
        build_balancer("mlb", single)


# -- losses --------------------------------------------------------------------------------
def test_joint_and_multiloss_losses_by_hand() -> None:
    model, batch = make()
    out = model(batch["inputs"])
    y = batch["label"]

    def ce(logits: torch.Tensor) -> torch.Tensor:  # -mean_b log softmax(logits)[b, y_b]
        return -(logits.log_softmax(-1)[torch.arange(len(y)), y]).mean()

    loss, parts = build_balancer("joint", model).compute_loss(model, batch, out)
    assert set(parts) == {"ce_fused"}
    assert loss.item() == pytest.approx(ce(out.fused).item(), rel=1e-6)
    assert parts["ce_fused"] == pytest.approx(ce(out.fused).item(), rel=1e-6)

    loss, parts = build_balancer("multiloss", model).compute_loss(model, batch, out)
    assert set(parts) == {"ce_fused", "ce_audio", "ce_visual"}
    by_hand = ce(out.fused) + ce(out.unimodal["audio"]) + ce(out.unimodal["visual"])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert parts["ce_visual"] == pytest.approx(ce(out.unimodal["visual"]).item(), rel=1e-6)
    # detached 0-d tensors, left on the device: the loop reads them at its logging steps only
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in parts.values())


# -- every registered method ---------------------------------------------------------------
@pytest.mark.parametrize("name", BALANCERS.names())
def test_every_method_runs_and_round_trips(name: str) -> None:
    model, batch = make()
    balancer = build_balancer(name, model)
    optimizer = torch.optim.SGD(balancer.param_groups(model, 0.1), lr=0.1)
    balancer.attach_optimizer(optimizer)
    balancer.on_epoch_start(model, 0, loader=[batch])
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = model(batch["inputs"])
        loss, parts = balancer.compute_loss(model, batch, out)
        assert torch.isfinite(loss) and all(v == v for v in parts.values())
        loss.backward()
        balancer.after_backward(model, out, batch)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    balancer.on_epoch_end(model, 0, {"acc": 0.5})
    assert all(isinstance(v, float) and v == v for v in balancer.log().values())

    buf = io.BytesIO()
    torch.save(balancer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_balancer(name, model)
    fresh.load_state_dict(state)
    assert fresh.log() == pytest.approx(balancer.log())
    torch.save(fresh.state_dict(), io.BytesIO())  # a resumed balancer checkpoints again


# -- requirements, registry, param groups ----------------------------------------------------
class NeedsDecomposable(Balancer):
    name = "needs_decomposable"
    requires = frozenset({"decomposable_head"})


def test_requires_decomposable_head() -> None:
    model, _ = make(fusion=TinyMLP)
    with pytest.raises(UserError, match="needs_decomposable needs a decomposable fusion head.*got TinyMLP"):
        NeedsDecomposable.check(model)
    ok, _ = make(fusion=TinyLate)
    NeedsDecomposable.check(ok)


def test_unknown_requirement_is_a_programming_error() -> None:
    class Odd(Balancer):
        requires = frozenset({"telepathy"})

    with pytest.raises(ValueError, match="telepathy"):
        Odd.check(make()[0])


def test_unknown_name() -> None:
    with pytest.raises(UserError, match="unknown balancing method 'nope'"):
        BALANCERS.get("nope")
    with pytest.raises(UserError):
        build_balancer("nope", make()[0])
    assert {"joint", "multiloss", "mlb"} <= set(BALANCERS.names())


def test_modality_param_groups_cover_the_model() -> None:
    model, _ = make()
    groups = modality_param_groups(model, 0.01, {"audio": 3.0})
    assert [g["name"] for g in groups] == ["audio", "visual", "shared"]
    assert [g["lr"] for g in groups] == pytest.approx([0.03, 0.01, 0.01])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
