"""``agm``: Adaptive Gradient Modulation (Li et al., "Boosting Multi-modal Model Performance
with Adaptive Gradient Modulation", ICCV 2023). Checked against the authors' code,
lihong2303/AGM_ICCV2023: ``run/CREMAD_main.py`` (``train``: scores, running means, coefficients,
gradient clipping) and ``model/CREMAD_net.py`` (``GradMod.forward``, its backward hooks).

Works for any fusion and M >= 2 modalities. On every training step, for the modality set N:

    v(S)   = fused logits with every modality outside S dropped (features zeroed), for every
             S subset of N; v(N) = out.fused (the loop's forward, train mode); the 2^M - 1
             others run in eval mode *with* gradients, as the reference's masked forwards
    phi_m  = sum_{S subset of N \\ {m}} |S|! (M - |S| - 1)! / M! * [v(S u {m}) - v(S)] + v({}) / M
             (the Shapley value plus an equal share of v({}), so sum_m phi_m = v(N); for M = 2
             this is the reference's m_a = (total - pad_audio + pad_visual) / 2)
    s_m    = batch mean of log max(softmax(phi_m)[y], 1e-8)     (minus the reference's score)
    r_m    = exp(s_m - mean_{j != m} s_j)                       (current relative strength)
    rbar_m = the same from sbar, the plain mean of s_m over every training step so far
             (carried across epochs; 0 before the first step, so rbar = 1 on step one)
    k_m    = exp(alpha * min(rbar_m - r_m, max_diff))          (alpha 1, max_diff 10; no floor)
    sbar_m <- sbar_m * (t - 1) / t + s_m / t                    (after k, every step)
    loss   = CE(sum_m phi_m, y), with the gradient reaching phi_m multiplied by k_m

so every parameter behind phi_m (encoders and the fusion, through all the forwards it
appears in) gets modality m's scaled share. A modality doing better than its historical
relative strength (r_m > rbar_m) is damped, one doing worse boosted. k is applied only in the
window ``modulation_starts <= epoch <= modulation_ends`` (default: the reference's first 20
of 100 epochs, scaled to the run's ``train.epochs``); outside it k = 1 and the running means
still update. After backward, when any fusion gradient leaves [-1, 1], all gradients are
clipped to norm ``clip_norm`` (1.0; the reference checks its fusion output layer), in every
epoch, as the reference does for AGM.

Departures (also in docs/methods.md):

- Outside the window the reference never calls ``update_scale`` again, so its hooks keep
  the last coefficient for the rest of training; we use k = 1 there, which is what the window
  is documented to mean.
- M > 2: r_m compares s_m with the mean of the other modalities' scores (exact for M = 2).
- Under DDP the scores are averaged over ranks before k, so every rank applies the same k; the
  masked forwards call the bare module (one DDP forward per step).
- Not in training mode (a validation loss): plain CE(fused), no extra forwards, no state change.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import Balancer, log_parts, register
from trainer.balancing.window import EpochWindow, PaperWindow
from trainer.distributed import all_reduce_mean


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, then restore every submodule's own train/eval flag."""
    flags = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


def coalition_values(model: nn.Module, inputs: Mapping[str, Any], modalities: Sequence[str],
                     full: torch.Tensor | None, detach: bool = True) -> dict[frozenset, torch.Tensor]:
    """v(S) for every S subset of ``modalities``: fused logits with the others dropped (float32).

    v(all) is ``full`` when given (not recomputed), else one more forward; the other 2^M - 1
    subsets cost one forward each. ``detach=False`` keeps every value in the autograd graph.
    """
    keep_graph = (lambda t: t.float()) if not detach else (lambda t: t.detach().float())
    if full is None:
        full = model(inputs).fused
    values: dict[frozenset, torch.Tensor] = {frozenset(modalities): keep_graph(full)}
    for size in range(len(modalities)):
        for keep in itertools.combinations(modalities, size):
            drop = frozenset(m for m in modalities if m not in keep)
            values[frozenset(keep)] = keep_graph(model(inputs, drop=drop).fused)
    return values


def shapley_logits(values: Mapping[frozenset, torch.Tensor], modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """phi_m = sum_{S subset of others} |S|!(M-|S|-1)!/M! [v(S u {m}) - v(S)]."""
    n = len(modalities)
    phi = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        total = torch.zeros_like(values[frozenset(modalities)])
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for s in itertools.combinations(others, size):
                s = frozenset(s)
                total = total + weight * (values[s | {m}] - values[s])
        phi[m] = total
    return phi


def relative_strength(scores: torch.Tensor) -> torch.Tensor:
    """r_m = exp(s_m - mean_{j != m} s_j)."""
    m = scores.numel()
    others = (scores.sum() - scores) / (m - 1)
    return torch.exp(scores - others)


def agm_coefficients(scores: torch.Tensor, running: torch.Tensor, alpha: float, max_diff: float = 10.0) -> torch.Tensor:
    """k_m = exp(alpha * min(rbar_m - r_m, max_diff)), capped above only (as the reference)."""
    diff = relative_strength(running) - relative_strength(scores)
    return torch.exp(alpha * diff.clamp(max=max_diff))


def agm_logits(values: Mapping[frozenset, torch.Tensor], modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """phi_m = Shapley value of m + v({}) / M: per-modality logits that sum to v(N)."""
    phi = shapley_logits(values, modalities)
    empty = values[frozenset()] / len(modalities)
    return {m: p + empty for m, p in phi.items()}


@register("agm")
class AGM(EpochWindow, Balancer):
    """Shapley-scored adaptive gradient modulation (see the module docstring).

    ``log()`` gives ``k/<m>``, ``score/<m>`` (last training batch) and ``mean/<m>`` (running mean).
    """

    requires = frozenset({"multimodal"})
    # run/CREMAD_main.py: modulation in epochs 1..20 (``--modulation_ends 20``, epochs counted
    # from 1) of the 100-epoch runs in its README
    PAPER_WINDOW = PaperWindow(first=0, last=19, epochs=100)

    def __init__(self, alpha: float = 1.0, max_diff: float = 10.0, clip_norm: float | None = 1.0,
                 modulation_starts: int = 0, modulation_ends: int | None = None) -> None:
        super().__init__()
        if not alpha > 0:
            raise UserError(f"agm: alpha must be > 0, got {alpha}")
        if not max_diff > 0:
            raise UserError(f"agm: max_diff must be > 0, got {max_diff}")
        if clip_norm is not None and not clip_norm > 0:
            raise UserError(f"agm: clip_norm must be > 0 or null, got {clip_norm}")
        self.alpha, self.max_diff = float(alpha), float(max_diff)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.init_window("agm", modulation_starts, modulation_ends)
        self.modalities: list[str] = []
        # (M,) float32 on the scores' device (a checkpoint holds it on the CPU): mean score over all steps
        self.running: torch.Tensor | None = None
        self.steps = 0
        self.epoch = 0
        self._last: dict[str, torch.Tensor | list[float]] = {}  # the last step's k and scores

    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Any = None, val_loader: Any = None) -> None:
        self.epoch = int(epoch)

    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        label = batch["label"]
        if not model.training:
            loss = F.cross_entropy(out.fused, label)
            return loss, log_parts({"ce_fused": loss})

        modalities = list(model.modalities)
        with eval_mode(model):  # with gradients: the fusion and encoders learn through them too
            values = coalition_values(model, batch["inputs"], modalities, out.fused, detach=False)
        phi = agm_logits(values, modalities)
        with torch.no_grad():
            scores = torch.stack([
                phi[m].float().softmax(dim=-1).gather(1, label.view(-1, 1)).clamp_min(1e-8).log().mean()
                for m in modalities
            ])
            # k, the running means and the hooks' factors stay on the device: no sync per step
            scores = all_reduce_mean(scores)

        if self.running is None or self.modalities != modalities:
            self.modalities, self.running, self.steps = modalities, torch.zeros(len(modalities), device=scores.device), 0
        running = self.running.to(scores.device)  # a resumed state arrives on the CPU
        k = agm_coefficients(scores, running, self.alpha, self.max_diff)
        if not self.in_window(self.epoch):
            k = torch.ones_like(k)
        self.steps += 1
        self.running = running * (self.steps - 1) / self.steps + scores / self.steps

        for i, m in enumerate(modalities):
            if phi[m].requires_grad:
                phi[m].register_hook(lambda g, k_m=k[i]: g * k_m)
        loss = F.cross_entropy(torch.stack([phi[m] for m in modalities]).sum(dim=0), label)
        self._last = {"k": k, "score": scores}
        return loss, log_parts({"ce_fused": loss})

    @torch.no_grad()
    def after_backward(self, model: nn.Module, out: Any, batch: Mapping[str, Any]) -> None:
        if self.clip_norm is None or not model.training:
            return
        grads = [p.grad for p in model.fusion.parameters() if p.grad is not None]
        # whether any fusion gradient leaves [-1, 1]: one device sync for all of them
        if grads and bool(torch.stack([g.abs().max().float() for g in grads]).gt(1.0).any()):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], self.clip_norm)

    def _last_lists(self) -> dict[str, list[float]]:
        return {key: v.tolist() if isinstance(v, torch.Tensor) else list(v) for key, v in self._last.items()}

    def log(self) -> dict[str, float]:
        if not self._last:
            return {}
        out = {}
        for key, values in self._last_lists().items():
            out.update({f"{key}/{m}": float(v) for m, v in zip(self.modalities, values)})
        if self.running is not None:
            out.update({f"mean/{m}": float(v) for m, v in zip(self.modalities, self.running.tolist())})
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.running is None:
            return {"epoch": self.epoch}
        return {"modalities": list(self.modalities), "running": self.running.detach().cpu().clone(), "steps": self.steps,
                "epoch": self.epoch, "last": self._last_lists()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        if "running" not in state:
            self.running, self.modalities, self.steps, self._last = None, [], 0, {}
            return
        self.modalities = list(state["modalities"])
        self.running = torch.as_tensor(state["running"], dtype=torch.float32).clone()
        self.steps = int(state.get("steps", 0))
        self._last = {key: list(v) for key, v in state.get("last", {}).items()}
