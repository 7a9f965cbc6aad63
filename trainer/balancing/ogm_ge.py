"""``ogm_ge``: On-the-fly Gradient Modulation with Generalisation Enhancement.

Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022.

Loss: CE on the fused logits. After backward, on every training step inside the active
window (``modulation_starts <= epoch <= modulation_ends``, inclusive, as the reference code;
by default the reference's epochs 0-50 of 100 scaled to the run's ``train.epochs``, see
``window.py``: 0-25 of a 50-epoch run):

    logits_m = x_m W_m^T + b / M                 (``per_modality_logits(..., split_bias=True)``;
                                                 the reference splits the concat head's bias in halves)
    s_m      = sum over the batch of softmax(logits_m)[y]            (detached, float32)
    rho_m    = s_m / mean_{j != m} s_j           (M = 2: rho_a = s_a / s_v, rho_v = 1 / rho_a)
    k_m      = 1 - tanh(alpha * rho_m)   if rho_m > 1,   else 1      (paper Eq. 10)

and every gradient of encoder m (``model.encoders[m].parameters()``) becomes
``k_m * g + N(0, std(g))`` with ``modulation="OGM_GE"``, or ``k_m * g`` with ``"OGM"``.

Choices, and where they depart from the brief or the reference:

- Coefficient. The paper's Eq. 10 and the authors' code (GeWu-Lab/OGM-GE_CVPR2022,
  ``coeff = 1 - tanh(alpha * relu(ratio))`` applied only when ``ratio > 1``) both use
  ``tanh(alpha * rho)``, not ``tanh(alpha * (rho - 1))``; we follow them by default. Note the
  jump at rho = 1 (k falls from 1 to 1 - tanh(alpha) ~= 0.34 for alpha = 0.8). ``shifted=True``
  gives the continuous variant ``1 - tanh(alpha * (rho - 1))``.
- M > 2: rho_m is s_m over the mean of the other modalities' scores (equal to the two-modality
  rule for M = 2); every modality with rho_m > 1 is slowed, the others keep k = 1.
- Noise (GE): as in the reference code, noise is added to the encoder gradients of *every*
  modality inside the window (the weak one keeps k = 1 but still gets noise); the paper's
  Eq. 11 also writes the noise term for both modalities. Its std is that of the unmodulated
  gradient tensor (+1e-8, as the reference; 0 for a one-element tensor), drawn from a
  seeded generator (see DDP below). The reference touches only 4-D (conv) weights; our
  encoders vary, so we modulate every encoder parameter that has a gradient. Unimodal heads
  and the fusion are not touched.
- Outside the window the gradients are left as they are (no scaling, no noise).
- Under DDP the scores are averaged over ranks before the ratio, so every rank uses the same
  k; the noise comes from a generator seeded with ``seed`` + the step count (kept in
  ``state_dict``), and the gradients are already all-reduced, so every rank adds the same
  noise and the replicas stay identical (and a resumed run draws the same noise).
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import Balancer, register
from trainer.balancing.window import EpochWindow, PaperWindow
from trainer.distributed import all_reduce_mean

MODULATIONS = ("OGM_GE", "OGM")


def ogm_ratios(scores: torch.Tensor) -> torch.Tensor:
    """rho_m = s_m / mean_{j != m} s_j (scores clamped to 1e-8)."""
    s = torch.as_tensor(scores, dtype=torch.float32).clamp_min(1e-8)
    m = s.numel()
    if m < 2:
        raise ValueError("OGM needs scores for at least 2 modalities")
    others = (s.sum() - s) / (m - 1)
    return s / others


def ogm_coefficients(ratios: torch.Tensor, alpha: float = 0.8, shifted: bool = False) -> torch.Tensor:
    """k_m = 1 - tanh(alpha * rho_m) (or alpha * (rho_m - 1) if ``shifted``) where rho_m > 1, else 1."""
    r = torch.as_tensor(ratios, dtype=torch.float32)
    arg = alpha * (r - 1) if shifted else alpha * r
    return torch.where(r > 1, 1 - torch.tanh(arg), torch.ones_like(r))


def _split_logits(fusion: nn.Module, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-modality logits with the bias shared out equally, when the fusion can do that."""
    fn = fusion.per_modality_logits
    if "split_bias" in inspect.signature(fn).parameters:
        return fn(features, split_bias=True)
    return fn(features)


@register("ogm_ge")
class OGMGE(EpochWindow, Balancer):
    """CE(fused); the dominant encoder's gradients are scaled by k (plus noise with GE).

    ``log()`` gives ``ratio/<m>`` and ``k/<m>`` of the last modulated step.
    """

    requires = frozenset({"decomposable_head", "multimodal"})
    # GeWu-Lab/OGM-GE_CVPR2022 main.py: --modulation_starts 0 --modulation_ends 50 --epochs 100
    PAPER_WINDOW = PaperWindow(first=0, last=50, epochs=100)

    def __init__(
        self,
        alpha: float = 0.8,
        modulation: str = "OGM_GE",
        modulation_starts: int = 0,
        modulation_ends: int | None = None,
        shifted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not alpha > 0:
            raise UserError(f"ogm_ge: alpha must be > 0, got {alpha}")
        if modulation not in MODULATIONS:
            raise UserError(f"ogm_ge: modulation must be one of {list(MODULATIONS)}, got {modulation!r}")
        self.alpha = float(alpha)
        self.modulation = modulation
        self.init_window("ogm_ge", modulation_starts, modulation_ends)
        self.shifted = bool(shifted)
        self.seed = int(seed)
        self.epoch = 0
        self.step = 0
        self._last: dict[str, float] = {}

    def active(self) -> bool:
        return self.in_window(self.epoch)

    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Any = None, val_loader: Any = None) -> None:
        self.epoch = int(epoch)

    @torch.no_grad()
    def after_backward(self, model: nn.Module, out: Any, batch: Mapping[str, Any]) -> None:
        if not self.active():
            return
        modalities = list(model.modalities)
        label = batch["label"].view(-1, 1)
        # float32: under bf16 autocast the features are bf16 while this runs outside autocast
        logits = _split_logits(model.fusion, {m: out.features[m].detach().float() for m in modalities})
        scores = torch.stack(
            [logits[m].float().softmax(dim=-1).gather(1, label).sum() for m in modalities]
        )
        scores = all_reduce_mean(scores)
        ratios = ogm_ratios(scores)
        k = ogm_coefficients(ratios, self.alpha, self.shifted)
        # k and every gradient's std (of the unmodulated gradient) go to the host as Python
        # scalars, as ``mul_`` and ``add_(alpha=...)`` take them: all in one device sync.
        grads = {m: [p.grad for p in model.encoders[m].parameters() if p.grad is not None] for m in modalities}
        stds = [g.float().std() for m in modalities for g in grads[m] if g.numel() > 1]
        host = torch.cat([k.float(), ratios.float(), *(s.reshape(1) for s in stds)]).tolist()
        n = len(modalities)
        k_values, r_values, std_values = host[:n], host[n:2 * n], iter(host[2 * n:])
        generators: dict[torch.device, torch.Generator] = {}
        for m, k_m in zip(modalities, k_values):
            for g in grads[m]:
                std = next(std_values) if g.numel() > 1 else 0.0
                if k_m != 1.0:
                    g.mul_(k_m)
                if self.modulation == "OGM_GE":
                    if g.device not in generators:
                        gen = torch.Generator(device=g.device)
                        generators[g.device] = gen.manual_seed(self.seed + self.step)
                    noise = torch.randn(
                        g.shape, generator=generators[g.device], device=g.device, dtype=g.dtype
                    )
                    g.add_(noise, alpha=std + 1e-8)
        self.step += 1
        self._last = {}
        for m, r_m, k_m in zip(modalities, r_values, k_values):
            self._last[f"ratio/{m}"] = float(r_m)
            self._last[f"k/{m}"] = float(k_m)

    def log(self) -> dict[str, float]:
        return dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "last": dict(self._last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self._last = {str(k): float(v) for k, v in dict(state.get("last", {})).items()}
