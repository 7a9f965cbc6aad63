"""``mlb``: Multi-Loss Balanced gradient modulation (Kontras et al., BMVC 2024, arXiv 2405.07930).

Loss (their Eq. 3): L = CE(fused) + sum_i CE(head_i), as ``multiloss``. After backward, on
every training batch and for every modality i of M >= 2 (Eqs. 4-7):

    s_i = mean over the batch of softmax(unimodal_i)[y]      (detached)
    r_i = mean_{j != i}(s_j) / s_i
    beta_i = beta_max if r_i > 1 else 2
    k_i = 1 + (beta_i - 1) * tanh(alpha * (r_i - 1))

and the gradients of every parameter of encoder i and of its unimodal head
(``model.modality_params()[i]``) are multiplied by k_i; the shared fusion parameters are left
alone. A lagging modality (r_i > 1) is sped up, to at most beta_max; a leading one (r_i < 1)
is slowed, k_i in (1 - tanh(alpha), 1), never to 0; k_i = 1 when the scores are equal, so
the modulation fades as the modalities converge.

Defaults alpha = 0.5, beta_max = 10 are the paper's ResNet-18 setting; for the Conformer
(Wav2Vec2 / face features) setting use alpha = 5, beta_max = 2.

Choices where the paper text leaves room:

- s_i: Eq. 4 is garbled (it sums over i as well as over classes, which would make every s_i
  equal); the text says "the sum of correct class predictions by the unimodal encoder". We use
  the softmax probability of the true class from each unimodal head, averaged over the batch
  (mean or sum gives the same ratios), computed in float32 from the training batch itself.
- Scope of k_i: Eq. 2 scales the update of theta_i, the encoder. We also scale the unimodal
  head of modality i (it is part of f_i in Eq. 3 and is owned by that modality); the fusion's
  parameters theta_v are not scaled.
- k_i scales the gradient after the backward pass and before gradient clipping, so a
  clipping norm can still cap an accelerated step; with plain SGD this equals Eq. 2's
  lr * k_i (bf16 autocast needs no loss scaling, so the gradient is at its true scale).
- s_i is clamped to ``eps`` (1e-8) so a head that scores 0 gives a large finite r_i.
- No warm-up or hard stop: balancing runs on every training step.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.distributed import all_reduce_mean
from trainer.balancing.base import register
from trainer.balancing.multiloss import MultiLoss

EPS = 1e-8


def _as_scores(scores: torch.Tensor | Sequence[float]) -> torch.Tensor:
    s = torch.as_tensor(scores)
    if not s.is_floating_point():
        s = s.to(torch.get_default_dtype())
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"MLB needs a 1-D score per modality for at least 2 modalities, got shape {tuple(s.shape)}")
    return s


def mlb_ratios(scores: torch.Tensor | Sequence[float], eps: float = EPS) -> torch.Tensor:
    """r_i = mean_{j != i}(s_j) / s_i, with s_i clamped to at least ``eps``."""
    s = _as_scores(scores).clamp_min(eps)
    m = s.numel()
    # mean_j (s_j / s_i) over j != i: the same value, but exactly 1 when the scores are equal
    ratio = s[None, :] / s[:, None]
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=s.device)
    return (ratio * off_diagonal).sum(dim=1) / (m - 1)


def mlb_coefficients(
    scores: torch.Tensor | Sequence[float], alpha: float = 0.5, beta_max: float = 10.0, eps: float = EPS
) -> torch.Tensor:
    """k_i = 1 + (beta_i - 1) tanh(alpha (r_i - 1)), beta_i = beta_max if r_i > 1 else 2."""
    return _coefficients(mlb_ratios(scores, eps), alpha, beta_max)


def _coefficients(r: torch.Tensor, alpha: float, beta_max: float) -> torch.Tensor:
    beta = torch.where(r > 1, torch.full_like(r, float(beta_max)), torch.full_like(r, 2.0))
    return 1 + (beta - 1) * torch.tanh(alpha * (r - 1))


def _as_list(values: Any) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


@register("mlb")
class MLB(MultiLoss):
    """Multi-loss objective plus per-modality gradient scaling by k_i (see the module docstring).

    ``log()`` gives ``s/<m>``, ``r/<m>`` and ``k/<m>`` of the last training step.
    """

    requires = frozenset({"multimodal"})

    def __init__(self, alpha: float = 0.5, beta_max: float = 10.0) -> None:
        super().__init__()
        if not alpha > 0:
            raise UserError(f"mlb: alpha must be > 0, got {alpha}")
        if not beta_max >= 1:
            raise UserError(f"mlb: beta_max must be >= 1, got {beta_max}")
        self.alpha = float(alpha)
        self.beta_max = float(beta_max)
        self._last: dict[str, Any] = {}

    @staticmethod
    def scores(out: Any, label: torch.Tensor, modalities: Sequence[str]) -> torch.Tensor:
        """s_i for each of ``modalities``: batch mean of softmax(unimodal_i)[y], detached, float32."""
        rows = []
        for m in modalities:
            prob = out.unimodal[m].detach().float().softmax(dim=-1)
            rows.append(prob.gather(1, label.view(-1, 1)).mean())
        return torch.stack(rows)

    def after_backward(self, model: nn.Module, out: Any, batch: Mapping[str, Any]) -> None:
        modalities = list(model.modalities)
        # Under DDP every rank must apply the same k: average the scores over the global batch.
        s = all_reduce_mean(self.scores(out, batch["label"], modalities))
        r = mlb_ratios(s)
        k = _coefficients(r, self.alpha, self.beta_max)
        params = model.modality_params()
        for i, m in enumerate(modalities):
            for p in params[m]:
                if p.grad is not None:
                    p.grad.mul_(k[i])
        self._last = {"modalities": modalities, "s": s, "r": r, "k": k}

    def log(self) -> dict[str, float]:
        if not self._last:
            return {}
        out = {}
        for key in ("s", "r", "k"):
            values = _as_list(self._last[key])
            out.update({f"{key}/{m}": float(v) for m, v in zip(self._last["modalities"], values)})
        return out

    def state_dict(self) -> dict[str, Any]:
        """Only the last step's s, r, k (so ``log()`` continues after a resume); MLB has no running state."""
        if not self._last:
            return {}
        last = {key: _as_list(self._last[key]) for key in ("s", "r", "k")}
        return {"last": {"modalities": list(self._last["modalities"]), **last}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        last = state.get("last")
        self._last = {key: list(value) for key, value in last.items()} if last else {}
