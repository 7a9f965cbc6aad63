"""DDP's ``find_unused_parameters`` only where it is needed.

The loop wraps forward + loss for DDP with ``find_unused_parameters = balancer.unused_parameters
or model.may_skip_parameters()`` (trainer/loop.py). Without it DDP skips a walk of the
autograd graph after every forward and a reduction of the used-parameter map in every
backward, but a trainable parameter that gets no gradient in some step then breaks the next
step (or hangs the ranks). So: for every registered method, in both preset families, a few
training steps on the CPU as the loop runs them leave no trainable parameter without a
gradient whenever the flags are False; and a method that says True does leave one out.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_every_method import FAMILIES, preset
from trainer.balancing import BALANCERS
from trainer.config import load_config
from trainer.optim import build_optimizer
from trainer.run_model import LossStep, build_run_model
from trainer.seeding import seed_everything

# The Conformer family without LayerDrop, so that the methods' own flag is what is tested
# there too (LayerDrop is the model's case: test_layerdrop_is_the_models_own_case).
NO_LAYERDROP = ["model.encoders.audio.layerdrop=0.0"]


def batch_for(family: str, seed: int, b: int = 8) -> dict:
    """A synthetic batch as the loader hands it over: some padded frames, samples and face frames."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 6, (b,), generator=g)
    if family == "resnet":
        mask = torch.ones(b, 2, dtype=torch.bool)
        mask[1::3, 1] = False
        inputs = {"audio": {"x": torch.randn(b, 1, 32, 40, generator=g)},
                  "visual": {"x": torch.randn(b, 2, 3, 32, 32, generator=g), "mask": mask}}
    else:
        wav_mask = torch.ones(b, 32000, dtype=torch.bool)
        wav_mask[1::2, 20000:] = False
        face_mask = torch.ones(b, 10, dtype=torch.bool)
        face_mask[::3, 7:] = False
        inputs = {"audio": {"x": torch.rand(b, 32000, generator=g) * 2 - 1, "mask": wav_mask},
                  "visual": {"x": torch.randn(b, 10, 1408, generator=g), "mask": face_mask}}
    return {"inputs": inputs, "label": label}


def gradless_after_steps(method: str, family: str, extra: list[str] = (), steps: int = 3):
    """(balancer, model, per step: the trainable parameters without a gradient after backward)."""
    cfg = load_config(preset(method, family), [*FAMILIES[family], "model.n_classes=6", "data.frames=2", *extra])
    seed_everything(0, deterministic=False)
    model, balancer = build_run_model(cfg)
    optimizer = build_optimizer(cfg, balancer.param_groups(model, cfg["optim"]["lr"]))
    balancer.attach_optimizer(optimizer)
    batches = [batch_for(family, seed) for seed in range(steps)]
    balancer.on_epoch_start(model, 0, batches, batches)  # PMR's prototypes: its loss term is active
    step_fn = LossStep(model, balancer)  # what DDP wraps
    missing = []
    for batch in batches:
        loss, held = step_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        missing.append({n for n, p in model.named_parameters() if p.requires_grad and p.grad is None})
        balancer.after_backward(model, held.out, batch)
        optimizer.step()
    return balancer, model, missing


CASES = [(m, f) for f in FAMILIES for m in BALANCERS.names()]


@pytest.mark.parametrize("method, family", CASES, ids=[f"{f}_{m}" for m, f in CASES])
def test_no_parameter_goes_without_a_gradient_where_ddp_is_told_so(method, family):
    balancer, model, missing = gradless_after_steps(method, family, NO_LAYERDROP if family == "conformer" else [])
    assert not model.may_skip_parameters()
    if not balancer.unused_parameters:
        assert all(not names for names in missing), f"{method} leaves {sorted(set().union(*missing))} without a gradient"
    else:  # True only where needed: the flag costs DDP a graph walk and a reduction every step
        assert any(missing), f"{method} says unused_parameters=True but every parameter got a gradient"


def test_mslr_flag_follows_its_objective():
    """MSLR trains CE(fused) alone on a decomposable head (the reference), the multi-loss otherwise."""
    balancer, _, missing = gradless_after_steps("mslr", "resnet")
    assert balancer.unused_parameters and all(n.startswith("heads.") for names in missing for n in names)
    balancer, _, missing = gradless_after_steps("mslr", "resnet", ["model.fusion={name: mid_mlp}"])
    assert not balancer.unused_parameters and all(not names for names in missing)


def test_layerdrop_is_the_models_own_case():
    """Wav2Vec2's LayerDrop skips whole layers at random whatever the method: with it the model
    asks DDP to look for unused parameters (the Hugging Face default is 0.1)."""
    _, model, _ = gradless_after_steps("multiloss", "conformer", steps=1)
    assert model.may_skip_parameters()  # the default config's LayerDrop
    _, model, missing = gradless_after_steps("multiloss", "conformer", ["model.encoders.audio.layerdrop=1.0"], steps=1)
    assert model.may_skip_parameters() and any(".w2v.encoder.layers." in n for n in missing[0])
    _, model, _ = gradless_after_steps("multiloss", "resnet", steps=1)
    assert not model.may_skip_parameters()


def test_a_batch_without_frames_leaves_no_trunk_parameter_without_gradient_under_ddp(tmp_path):
    """With no real frame in a batch the visual trunk does not run; under an initialised process
    group it is touched with a zero, so a method with ``unused_parameters`` False keeps every
    gradient (outside DDP nothing changes: the gradients stay missing, as before)."""
    import torch.distributed as dist

    from trainer.encoders.resnet_encoders import ResNet18Visual

    encoder = ResNet18Visual(width=4)
    x, mask = torch.randn(2, 2, 3, 32, 32), torch.zeros(2, 2, dtype=torch.bool)
    assert not encoder(x, mask).requires_grad  # outside DDP: the trunk is not touched at all
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = encoder(x, mask)
        out.sum().backward()
    finally:
        dist.destroy_process_group()
    assert torch.equal(out, torch.zeros_like(out))
    grads = [p.grad for p in encoder.trunk.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
