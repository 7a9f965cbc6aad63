"""trainer/precise_bn.py: batch-norm statistics recomputed as a plain average over batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.precise_bn import batch_norms, recompute_bn_stats


class BNNet(nn.Module):
    """A batch-norm layer behind a linear map, with the model's input convention."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.bn(self.proj(inputs["a"]["x"]))


def batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    # Batches of different scale and offset, so an EMA and a plain average differ clearly.
    return [{"inputs": {"a": {"x": torch.randn(8, 3, generator=g) * (1 + i) + 3 * i}}, "label": torch.zeros(8)}
            for i in range(n)]


def test_statistics_are_the_plain_average_of_the_batches_statistics():
    torch.manual_seed(0)
    net = BNNet().eval()
    data = batches(5)
    with torch.no_grad():
        feats = [net.proj(b["inputs"]["a"]["x"]) for b in data]
    expect_mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    expect_var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)  # what BN tracks: unbiased
    used = recompute_bn_stats(net, data)
    assert used == 5
    assert torch.allclose(net.bn.running_mean, expect_mean, atol=1e-5)
    assert torch.allclose(net.bn.running_var, expect_var, rtol=1e-5)
    assert not net.training and net.bn.momentum == 0.1  # mode and momentum restored
    assert all(p.grad is None for p in net.parameters())


def test_max_batches_limits_the_pass():
    net = BNNet()
    data = batches(5)
    assert recompute_bn_stats(net, data, max_batches=2) == 2
    first_two = BNNet()
    first_two.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("bn.running")}, strict=False)
    recompute_bn_stats(first_two, data[:2])
    assert torch.allclose(net.bn.running_mean, first_two.bn.running_mean)
    assert net.training  # a model in training mode stays in training mode


def test_no_batch_leaves_the_statistics_as_trained():
    net = BNNet()
    net.bn.running_mean.fill_(2.0)
    net.bn.running_var.fill_(5.0)
    assert recompute_bn_stats(net, []) == 0
    assert torch.equal(net.bn.running_mean, torch.full((4,), 2.0))
    assert torch.equal(net.bn.running_var, torch.full((4,), 5.0))


def test_a_model_without_batch_norm_is_not_run():
    net = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    calls = []

    def never(*_args):
        calls.append(1)
        raise AssertionError("a model without batch norm must not be forwarded")

    assert batch_norms(net) == [] and recompute_bn_stats(net, map(never, range(3))) == 0
    assert calls == []


def test_evaluation_after_recompute_matches_training_mode_on_the_same_data():
    """The point of it: once the statistics describe the data, eval mode on one big batch
    gives what training mode (batch statistics) gives on that batch."""
    torch.manual_seed(1)
    net = BNNet()
    x = torch.randn(64, 3) * 4 + 7
    with torch.no_grad():
        net.train()
        in_training_mode = net({"a": {"x": x}})
    recompute_bn_stats(net, [{"inputs": {"a": {"x": x}}, "label": torch.zeros(64)}])
    net.eval()
    with torch.no_grad():
        in_eval_mode = net({"a": {"x": x}})
    # running_var is unbiased (n / (n - 1)), the batch's is biased: equal up to that factor
    assert torch.allclose(in_eval_mode * (64 / 63) ** 0.5, in_training_mode, atol=1e-4)


def test_a_one_sample_batch_is_skipped_and_an_error_restores_the_statistics():
    net = BNNet()
    data = batches(3)
    lone = {"inputs": {"a": {"x": torch.randn(1, 3)}}, "label": torch.zeros(1)}
    for b in data:
        b["label"] = torch.zeros(8)
    assert recompute_bn_stats(net, [data[0], lone, data[1]]) == 2
    expect = BNNet()
    expect.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("bn.running")}, strict=False)
    recompute_bn_stats(expect, [data[0], data[1]])
    assert torch.allclose(net.bn.running_mean, expect.bn.running_mean)
    before = net.bn.running_mean.clone()

    def broken():
        yield data[2]
        raise RuntimeError("a damaged batch")

    with pytest.raises(RuntimeError):
        recompute_bn_stats(net, broken())
    assert torch.equal(net.bn.running_mean, before) and net.bn.momentum == 0.1
