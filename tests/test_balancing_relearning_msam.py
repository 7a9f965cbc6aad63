"""Diagnosing & Re-learning and M-SAM: their core rules against hand values on a tiny model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from tiny_model import MODS, N_CLASSES, make
from trainer.balancing import build_balancer
from trainer.balancing.msam import frozen_batchnorm_stats, shapley_accuracy, split_weights
from trainer.balancing.relearning import cluster_purity, minmax_scale, purity, reinit_strength, soft_reinit


# -- Re-learning: the diagnosis ------------------------------------------------------------
def test_purity_by_hand():
    clusters = np.array([0, 0, 1, 1, 1, 2])
    labels = np.array([0, 1, 1, 1, 0, 3])
    # cluster 0: {0, 1} -> 1; cluster 1: {1, 1, 0} -> 2; cluster 2: {3} -> 1
    assert purity(clusters, labels) == pytest.approx(4 / 6)


def test_minmax_scale_maps_columns_onto_minus_one_one():
    x = np.array([[0.0, 5.0, 2.0], [10.0, 5.0, 4.0], [5.0, 5.0, 3.0]])
    y = minmax_scale(x)
    np.testing.assert_allclose(y[:, 0], [-1, 1, 0])
    np.testing.assert_allclose(y[:, 1], [-1, -1, -1])  # a constant column, as scikit-learn maps it
    np.testing.assert_allclose(y[:, 2], [-1, 1, 0])


def test_cluster_purity_tells_separable_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    separable = np.eye(4)[labels] * 10 + rng.normal(0, 0.1, (120, 4))
    noise = rng.normal(0, 1, (120, 4))
    assert cluster_purity(separable, labels, 4) == 1.0
    assert cluster_purity(noise, labels, 4) < 0.6
    assert math.isnan(cluster_purity(separable[:3], labels[:3], 4))  # fewer samples than classes


def test_reinit_strength_is_tanh_of_lambda_times_gap():
    assert reinit_strength(0.9, 0.6, 3.0) == pytest.approx(math.tanh(0.9))
    assert reinit_strength(0.6, 0.9, 3.0) == pytest.approx(math.tanh(0.9))  # |gap|
    assert reinit_strength(0.7, 0.7, 3.0) == 0.0
    assert reinit_strength(float("nan"), 0.7, 3.0) == 0.0


def test_soft_reinit_interpolates_towards_the_initial_weights():
    layer = nn.Linear(3, 2)
    initial = {n: torch.randn_like(p) for n, p in layer.named_parameters()}
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    soft_reinit(layer, initial, 0.25)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.detach(), 0.25 * initial[n] + 0.75 * before[n])


def _loaders(model, n=48, seed=1):
    """Training batches where the audio input encodes the label (separable) and validation
    batches where nothing does: audio's train/val purity gap is large."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % N_CLASSES

    def batches(labels, informative):
        a = torch.randn(len(labels), 3, generator=g) * 0.05
        if informative:
            a = a + torch.eye(N_CLASSES, 3)[labels] * 4 + (labels == 3).float()[:, None] * -4
        v = torch.randn(len(labels), 4, generator=g)
        return [{"inputs": {"audio": {"x": a[i:i + 16]}, "visual": {"x": v[i:i + 16]}}, "label": labels[i:i + 16]}
                for i in range(0, len(labels), 16)]

    return batches(y, True), batches(y, False)


def test_relearning_reinitialises_by_the_diagnosed_strength():
    model, _ = make(seed=3)
    train, val = _loaders(model)
    balancer = build_balancer("relearning", model, lam=3.0, every=2, times=1)
    balancer.on_epoch_start(model, 0, train, val)               # captures theta_0, no diagnosis
    theta0 = {m: {n: p.detach().clone() for n, p in model.encoders[m].named_parameters()} for m in MODS}
    with torch.no_grad():                                      # "training" moves every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}

    for epoch in (1, 2):                                       # not due: nothing changes
        balancer.on_epoch_start(model, epoch, train, val)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), trained[n])

    # due at the start of epoch 3: the reference re-initialises after (0-based) epoch 2 % every == 0
    balancer.on_epoch_start(model, 3, train, val)
    log = balancer.log()
    assert log["reinits"] == 1.0
    for m in MODS:
        gap = abs(log[f"purity_train/{m}"] - log[f"purity_val/{m}"])
        alpha = log[f"alpha/{m}"]
        assert alpha == pytest.approx(math.tanh(3.0 * gap))
        for n, p in model.encoders[m].named_parameters():
            torch.testing.assert_close(p.detach(), alpha * theta0[m][n] + (1 - alpha) * trained[f"encoders.{m}.{n}"])
    assert log["alpha/audio"] > log["alpha/visual"]            # the memorising modality is pulled back harder
    for n, p in model.named_parameters():                      # heads and fusion are not touched
        if not n.startswith("encoders."):
            torch.testing.assert_close(p.detach(), trained[n])

    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    balancer.on_epoch_start(model, 5, train, val)              # ``times`` reached: no more
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), after[n])


def test_relearning_state_round_trip_keeps_the_initial_weights():
    model, _ = make(seed=4)
    train, val = _loaders(model)
    balancer = build_balancer("relearning", model, every=1, times=3)
    balancer.on_epoch_start(model, 0, train, val)
    balancer.on_epoch_start(model, 1, train, val)              # after epoch 0: never (E > 0)
    assert balancer.reinits == 0
    balancer.on_epoch_start(model, 2, train, val)
    state = copy.deepcopy(balancer.state_dict())
    fresh = build_balancer("relearning", model, every=1, times=3)
    fresh.load_state_dict(state)
    assert fresh.reinits == 1
    for m in MODS:
        for n, t in balancer.initial[m].items():
            torch.testing.assert_close(fresh.initial[m][n], t)
    assert fresh.log() == balancer.log()


def test_relearning_defaults_and_kmeans_follow_the_authors(monkeypatch):
    """GeWu-Lab/Diagnosing_Relearning_ECCV2024 code/ours.py: --reinit_epoch 20 --reinit_num 3,
    KMeans(n_clusters, random_state=0) with scikit-learn's n_init of the time, 10."""
    model, _ = make()
    balancer = build_balancer("relearning", model)
    assert (balancer.every, balancer.times, balancer.lam) == (20, 3, 3.0)
    assert [e for e in range(100) if balancer.due(e)] == [21, 41, 61, 81]  # after epochs 20, 40, 60, ...
    import sklearn.cluster

    seen = []
    real = sklearn.cluster.KMeans

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sklearn.cluster, "KMeans", spy)
    rng = np.random.default_rng(0)
    cluster_purity(rng.normal(size=(30, 4)), np.arange(30) % 3, 3)
    assert seen == [{"n_clusters": 3, "random_state": 0, "n_init": 10}]


@pytest.mark.parametrize("options", [{"lam": 0}, {"every": 0}, {"times": -1}, {"max_batches": 0}, {"n_init": 0}])
def test_relearning_rejects_bad_options(options):
    model, _ = make()
    with pytest.raises(UserError, match="relearning"):
        build_balancer("relearning", model, **options)


# -- M-SAM -----------------------------------------------------------------------------------
def _logits_with_accuracy(label, n_right):
    """Logits whose argmax is right on exactly the first ``n_right`` samples."""
    logits = torch.zeros(len(label), N_CLASSES)
    wrong = (label + 1) % N_CLASSES
    target = torch.where(torch.arange(len(label)) < n_right, label, wrong)
    logits[torch.arange(len(label)), target] = 1.0
    return logits


def test_shapley_accuracy_by_hand():
    label = torch.tensor([0, 1, 2, 3])
    a, v = "audio", "visual"
    values = {frozenset(): _logits_with_accuracy(label, 1), frozenset({a}): _logits_with_accuracy(label, 3),
              frozenset({v}): _logits_with_accuracy(label, 1), frozenset({a, v}): _logits_with_accuracy(label, 4)}
    phi = shapley_accuracy(values, label, [a, v])
    # v_a = 1/2 [(0.75 - 0.25) + (1 - 0.25)], v_v = 1/2 [(0.25 - 0.25) + (1 - 0.75)]
    torch.testing.assert_close(phi, torch.tensor([0.625, 0.125]))
    assert float(phi.sum()) == pytest.approx(1.0 - 0.25)      # efficiency: sum = acc(all) - acc(none)


class TrainOnlyShift(nn.Module):
    """Wraps a fusion; in train mode the logits are negated (as dropout or batch-norm can make
    train-mode outputs differ from eval-mode ones)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, features):
        out = self.inner(features)
        return -out if self.training else out


def test_msam_scores_every_coalition_in_eval_mode():
    model, batch = make(seed=5, batch_size=8)
    model.fusion = TrainOnlyShift(model.fusion)
    balancer = build_balancer("msam", model)
    balancer.compute_loss(model, batch, model(batch["inputs"]))
    model.eval()
    with torch.no_grad():
        values = {frozenset(keep): model(batch["inputs"], drop={m for m in MODS if m not in keep}).fused
                  for keep in ((), ("audio",), ("visual",), MODS)}
    model.train()
    train_acc = (model(batch["inputs"]).fused.argmax(-1) == batch["label"]).float().mean()
    eval_acc = (values[frozenset(MODS)].argmax(-1) == batch["label"]).float().mean()
    assert train_acc != eval_acc  # the test needs the two modes to disagree
    want = shapley_accuracy(values, batch["label"], list(MODS))
    got = torch.tensor([balancer.log()[f"shapley/{m}"] for m in MODS])
    torch.testing.assert_close(got, want)


def test_split_weights():
    torch.testing.assert_close(split_weights(torch.tensor([0.3, 0.1]), True), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(split_weights(torch.tensor([0.6, -0.2]), True), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(split_weights(torch.tensor([0.0, -0.1]), True), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(split_weights(torch.tensor([0.3, -0.1]), False), torch.tensor([0.3, -0.1]))


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch["inputs"]).fused, batch["label"]).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion", ["late_linear", "gated"])
def test_msam_gradient_is_the_weighted_mix_of_sam_and_plain_gradients(fusion):
    model, batch = make(seed=5, batch_size=8, fusion=fusion)
    rho = 0.3
    balancer = build_balancer("msam", model, rho=rho)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # By hand: g at theta, then g at theta + rho g/||g|| on a copy.
    g0 = _grads(model, batch)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g0.values()))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in shifted.named_parameters():
            if n in g0:
                p.add_(rho * g0[n] / norm)
    g1 = _grads(shifted, batch)

    calls = []
    model.fusion.register_forward_hook(lambda *a: calls.append(1))
    model.zero_grad(set_to_none=True)
    out = model(batch["inputs"])
    loss, _ = balancer.compute_loss(model, batch, out)
    loss.backward()
    balancer.after_backward(model, out, batch)
    assert len(calls) == 1 + 4 + 1   # the loop's forward, 2^M coalitions (all in eval mode), the perturbed pass

    log = balancer.log()
    dominant = max(MODS, key=lambda m: log[f"shapley/{m}"])
    assert log[f"dominant/{dominant}"] == 1.0
    w_d = log[f"weight/{dominant}"]
    assert sum(log[f"weight/{m}"] for m in MODS) == pytest.approx(1.0)
    for n, p in model.named_parameters():
        if n in g0:
            torch.testing.assert_close(p.grad, w_d * g1[n] + (1 - w_d) * g0[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.detach(), weights_before[n], rtol=0, atol=0)  # restored exactly


def test_msam_with_rho_zero_is_plain_training():
    model, batch = make(seed=6)
    g0 = _grads(model, batch)
    balancer = build_balancer("msam", model, rho=0.0)
    model.zero_grad(set_to_none=True)
    out = model(batch["inputs"])
    loss, _ = balancer.compute_loss(model, batch, out)
    loss.backward()
    balancer.after_backward(model, out, batch)
    for n, p in model.named_parameters():
        if n in g0:
            torch.testing.assert_close(p.grad, g0[n])


def test_msam_in_eval_mode_is_plain_cross_entropy():
    model, batch = make(seed=7)
    balancer = build_balancer("msam", model)
    model.eval()
    out = model(batch["inputs"])
    loss, parts = balancer.compute_loss(model, batch, out)
    assert loss.item() == pytest.approx(F.cross_entropy(out.fused, batch["label"]).item())
    assert balancer.log() == {}


def test_frozen_batchnorm_stats_keep_running_statistics():
    bn = nn.BatchNorm1d(3)
    bn.train()
    before = bn.running_mean.clone()
    with frozen_batchnorm_stats(bn):
        bn(torch.randn(16, 3) + 5.0)
    torch.testing.assert_close(bn.running_mean, before)
    assert bn.momentum == 0.1
    bn(torch.randn(16, 3) + 5.0)
    assert (bn.running_mean > before).all()


def test_msam_needs_two_modalities_and_rejects_negative_rho():
    model, _ = make()
    with pytest.raises(UserError, match="rho"):
        build_balancer("msam", model, rho=-1)
