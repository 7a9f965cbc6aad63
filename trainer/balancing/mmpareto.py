"""``mmpareto``: MMPareto gradient integration (Wei & Hu, ICML 2024).

"MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance". Reference code:
GeWu-Lab/MMPareto_ICML2024 (``code/MMPareto.py``, read for the rule; not copied).

Loss: L = CE(fused) + sum_m CE(head_m), as ``multiloss``; it is what the loop back-propagates,
so the unimodal heads and the fusion get the ordinary gradients of L. For the parameters of
each encoder m the gradient is replaced (per encoder, on the concatenation of all its
trainable parameters' gradients):

    g_mm  = dCE(fused)/d theta_m,    g_uni = dCE(head_m)/d theta_m
    cos   = <g_mm, g_uni> / (|g_mm| |g_uni|)
    alpha = 1/2                                                   if cos >= 0 (no conflict)
    alpha = clip(<g_uni - g_mm, g_uni> / |g_mm - g_uni|^2, 0, 1)  otherwise (two-task MGDA,
                                                                 the minimum-norm point)
    new   = 2 alpha g_mm + 2 (1 - alpha) g_uni

so without conflict ``new = g_mm + g_uni`` (weights 1/1, the plain sum). Then, per parameter
tensor as in the reference code, the magnitude is restored: with ``t`` that tensor's gradient
of the total loss L (``p.grad`` after the loop's backward, which is g_mm + g_uni for it),

    new <- new * max(1, |t| / |new|) * gamma

i.e. the Pareto direction keeps at least the magnitude of the summed gradient (the paper's
point: the min-norm combination shrinks the step, which loses SGD noise/generalisation, so
the magnitude is scaled back up). Without conflict |t| = |new| and the result is the sum
(times gamma).

Design (when is what computed):

- ``compute_loss`` (training mode with grad enabled only) calls ``torch.autograd.grad`` with
  ``retain_graph=True``: once for CE(fused) w.r.t. the parameters of all encoders together, and
  once per modality for CE(head_m) w.r.t. encoder m's parameters: M + 1 extra backward passes
  (``extra_backwards`` counts the last step's). CE(head_j), j != m, does not reach encoder m in
  ``MultimodalModel`` (head_j sees only features_j), so the total-loss gradient of encoder m is
  exactly g_mm + g_uni. ``torch.autograd.grad`` does not touch ``.grad`` (nor DDP's reducer
  hooks, which sit on the gradient accumulators), so the loop's backward is unchanged.
- ``after_backward`` overwrites each encoder parameter's ``.grad`` with the combined gradient.
  Heads and fusion are not touched.

Choices:

- ``gamma`` defaults to 1.0 so the agreeing case is exactly the sum; the reference code
  multiplies every encoder gradient by ``gamma = 1.5`` (CREMA-D setting); pass ``gamma=1.5``
  to reproduce it.
- The reference treats cos > 0 as agreeing and solves MGDA otherwise; we use cos >= 0 (the
  brief's rule). With cos = 0 exactly the two differ only on a measure-zero set.
- The reference's MinNormSolver clips alpha to [0.001, 0.999]; under conflict (cos < 0) the
  closed form is always strictly inside (0, 1), so clipping to [0, 1] gives the same value.
- ``rescale=False`` skips the magnitude restoration (pure MGDA direction and norm).
- DDP: the stored g_mm/g_uni are local to the rank, while ``.grad`` is already averaged; they
  are averaged over ranks (``all_reduce_mean``) before cos/alpha, so every rank computes the
  same combined gradient.
- AMP: the extra gradients are of the *unscaled* losses; cos and alpha are scale-invariant and
  the magnitude comes from the unscaled ``.grad``, but fp16 gradients may underflow without a
  loss scale (bf16 is fine).
- If an encoder's gradient is None for a parameter in either loss it counts as zero; if
  both g_mm and g_uni are zero the encoder is left as it is.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import Balancer, cross_entropy_parts, log_parts, register
from trainer.distributed import all_reduce_mean


def pareto_alpha(g_mm: torch.Tensor, g_uni: torch.Tensor) -> tuple[float, float]:
    """(cos, alpha) for flat gradients: alpha = 1/2 if cos >= 0, else the two-task MGDA weight."""
    a, b = g_mm.double(), g_uni.double()
    na, nb = a.norm(), b.norm()
    cos = float((a @ b) / (na * nb)) if na > 0 and nb > 0 else 0.0
    if cos >= 0:
        return cos, 0.5
    diff = a - b
    alpha = float(((b - a) @ b) / (diff @ diff))
    return cos, min(max(alpha, 0.0), 1.0)


@register("mmpareto")
class MMPareto(Balancer):
    """Multi-loss; each encoder's gradient is the MMPareto combination (see the module docstring).

    ``log()`` gives ``cos/<m>``, ``conflict/<m>`` (1.0 or 0.0) and ``alpha/<m>`` of the last step.
    """

    requires = frozenset({"multimodal"})
    unused_parameters = False  # the multi-loss objective: every head has its CE term

    def __init__(self, gamma: float = 1.0, rescale: bool = True) -> None:
        super().__init__()
        if not gamma > 0:
            raise UserError(f"mmpareto: gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self.rescale = bool(rescale)
        self.extra_backwards = 0
        self._pending: dict[str, tuple[list[nn.Parameter], list[torch.Tensor], list[torch.Tensor]]] = {}
        self._last: dict[str, float] = {}

    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts = cross_entropy_parts(out, batch["label"], unimodal=True)
        self._pending = {}
        if not (model.training and torch.is_grad_enabled() and loss.requires_grad):
            return loss, log_parts(parts)
        enc = {m: [p for p in model.encoders[m].parameters() if p.requires_grad] for m in model.modalities}
        flat = [p for m in model.modalities for p in enc[m]]
        self.extra_backwards = 0
        if not flat:
            return loss, log_parts(parts)

        def grads(target: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
            self.extra_backwards += 1
            if not target.requires_grad:
                return [torch.zeros_like(p) for p in params]
            gs = torch.autograd.grad(target, params, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs)]

        g_mm_all = grads(parts["ce_fused"], flat)
        i = 0
        for m in model.modalities:
            n = len(enc[m])
            if n:
                g_mm = g_mm_all[i:i + n]
                g_uni = grads(parts[f"ce_{m}"], enc[m])
                self._pending[m] = (enc[m], g_mm, g_uni)
            i += n
        return loss, log_parts(parts)

    @torch.no_grad()
    def after_backward(self, model: nn.Module, out: Any, batch: Mapping[str, Any]) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        last: dict[str, float] = {}
        for m, (params, g_mm, g_uni) in pending.items():
            n_mm = sum(g.numel() for g in g_mm)
            both = torch.cat([g.float().reshape(-1) for g in (*g_mm, *g_uni)])
            both = all_reduce_mean(both)
            a, b = both[:n_mm], both[n_mm:]
            cos, alpha = pareto_alpha(a, b)
            last[f"cos/{m}"] = cos
            last[f"conflict/{m}"] = float(cos < 0)
            last[f"alpha/{m}"] = alpha
            if not (a.abs().sum() > 0 or b.abs().sum() > 0):
                continue
            offset = 0
            for p in params:
                k = p.numel()
                if p.grad is None:
                    offset += k
                    continue
                new = (2 * alpha * a[offset:offset + k] + 2 * (1 - alpha) * b[offset:offset + k]).view_as(p)
                offset += k
                if self.rescale:  # scaled up to the unmodulated norm when that is larger
                    # (selected on the device: no host sync per parameter)
                    new_norm = new.norm()
                    ratio = p.grad.float().norm() / new_norm
                    new = torch.where((new_norm > 0) & (ratio > 1), new * ratio, new)
                p.grad.copy_(new * self.gamma)
        self._last = last

    def log(self) -> dict[str, float]:
        return dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        """Only the last step's log (MMPareto has no running state)."""
        return {"last": dict(self._last)} if self._last else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._last = {str(k): float(v) for k, v in dict(state.get("last", {})).items()}
