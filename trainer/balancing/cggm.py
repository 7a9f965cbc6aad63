"""``cggm``: Classifier-guided Gradient Modulation (Guo et al., NeurIPS 2024).

"Classifier-guided Gradient Modulation for Enhanced Multimodal Learning". Checked against
zrguo/CGGM ``src/msatrain.py`` (``train_model.train``) and ``src/eval_metrics.py`` (``cal_cos``).

The unimodal heads are *probes*: as in the reference (its classifiers see ``hs`` detached),
each head m is trained with CE on the detached features of modality m, so its loss does not
reach the encoders. On every training step (``compute_loss`` in training mode):

    acc_m^t   = accuracy of head m on this batch                     (DDP: averaged over ranks)
    d_m       = acc_m^t - acc_m^{t-1}       (acc^{-1} = 0, as the reference's ``acc1 = [0]*M``)
    S         = sum_m d_m + eps                                      (eps = 1e-8, reference)
    B_m       = (S - d_m) / S                                        (magnitude coefficient)

so the modality whose head improved least gets the largest coefficient (for M = 2,
B_1 = d_2 / S). After backward, every gradient of encoder m is multiplied by ``rho * B_m``
(reference ``params.grad *= coeff[i] * rou``; the heads and the fusion are not scaled).

Direction term (the paper's L_gm, reference ``l_gm``):

    L_gm = ( sum_m |B_m| - sum_m B_m cos(g_F,m, sg[g_m]) ) / M
    loss = CE(fused) + sum_m CE(head_m(sg[h_m])) + lambda * L_gm

L_gm trains the fusion only: in the reference ``cls_optimizer.zero_grad()`` runs after the
backward of ``raw_loss`` (which holds ``lamda * l_gm``), so the classifiers' share of its
gradient is thrown away; here the heads' gradient g_m enters L_gm as a constant.

Optimizer: the reference trains its classifiers with their own optimizer at ``--cls_lr``
(5e-4 against the model's 1e-3) and no weight decay. ``param_groups`` gives the heads their
own group ``"heads"`` with lr ``cls_lr`` (default half the base rate, the reference's ratio)
and weight decay 0; the rest is one group at the base rate.

Choices where the reference and our model differ:

- Which gradients. The paper compares the gradient of unimodal classifier m with that of the
  fusion; the reference takes ``cosine_similarity`` of the classifiers' and the fusion's
  output-layer *weights* (shapes equal there). Our heads are Linear(D_m, C) and the fusion
  is any module, so shapes differ. We compare the gradients the two losses send to the same
  place, modality m's features: g_F,m = dCE(fusion(sg[h]))/dh_m and g_m = dCE(head_m(sg[h_m]))
  /dh_m (each (B, D_m), flattened); g_F,m keeps its graph (``create_graph=True``) so L_gm is
  differentiable in the fusion's parameters, g_m is a constant. Features are detached (sg)
  for this term, so L_gm trains the fusion only, never the encoders or heads (the reference's
  term likewise reaches only the fusion's output layer; ours reaches every fusion parameter
  that shapes g_F,m). Cost: one extra fusion forward on detached features and one small
  double-backward graph.
- Timing. The reference adds the previous step's l_gm and scales with this step's B; we
  compute B from this batch before the backward and use it for both (same B in L_gm and in
  the scaling).
- Accuracy is the batch top-1 accuracy of head m (before this step's update).
- Stability: when S is near 0 with d_m != 0 (e.g. +1/6 and -1/6 on a small batch), the
  reference's B explodes (~1e7). ``max_coeff`` (default 10) clamps B_m to
  [-max_coeff, max_coeff]; ``max_coeff=None`` reproduces the reference exactly. Negative B
  (a head improved more than the total) is kept, as in the reference.
- The heads' group is a group of the loop's optimizer, not a second optimizer: the same
  update rule per parameter, but the loop's schedule (warm-up, cosine) and gradient clipping
  cover it too (the reference clips and schedules the model only).
- Defaults: ``rho = 1.3`` (reference ``--rou`` for every dataset), ``lam = 0.2`` (reference
  ``--lamda`` for IEMOCAP and CMU-MOSI; UPMC-Food uses 0.05, BraTS 0.1).
- Outside training (or with grad disabled) the loss is CE(fused) + sum_m CE(heads) and no
  state changes; ``after_backward`` then does nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import Balancer, log_parts, read_floats, register
from trainer.distributed import all_reduce_mean

EPS = 1e-8


def cggm_coefficients(
    acc: Sequence[float], prev: Sequence[float], eps: float = EPS, max_coeff: float | None = 10.0
) -> list[float]:
    """B_m = (S - d_m) / S with d = acc - prev, S = sum(d) + eps; clamped to +-max_coeff if given."""
    d = [float(a) - float(p) for a, p in zip(acc, prev, strict=True)]
    s = sum(d) + eps
    coeff = [(s - d_m) / s for d_m in d]
    if max_coeff is not None:
        coeff = [min(max(c, -max_coeff), max_coeff) for c in coeff]
    return coeff


@register("cggm")
class CGGM(Balancer):
    """CE(fused) + probe heads + lambda * L_gm; encoder m's gradients scaled by rho * B_m.

    ``log()`` gives ``acc/<m>``, ``B/<m>``, ``k/<m>`` (= rho * B_m), ``cos/<m>`` and ``l_gm``.
    """

    requires = frozenset({"multimodal"})
    # CE(fused) reaches the encoders and the fusion, each probe CE its head (on detached features)
    unused_parameters = False

    def __init__(
        self, rho: float = 1.3, lam: float = 0.2, eps: float = EPS, max_coeff: float | None = 10.0,
        cls_lr: float | None = None,
    ) -> None:
        super().__init__()
        if not rho > 0:
            raise UserError(f"cggm: rho must be > 0, got {rho}")
        if not lam >= 0:
            raise UserError(f"cggm: lam must be >= 0, got {lam}")
        if not eps > 0:
            raise UserError(f"cggm: eps must be > 0, got {eps}")
        if max_coeff is not None and not max_coeff > 0:
            raise UserError(f"cggm: max_coeff must be > 0 or None, got {max_coeff}")
        if cls_lr is not None and not cls_lr > 0:
            raise UserError(f"cggm: cls_lr must be > 0 or null (half the base rate), got {cls_lr}")
        self.rho = float(rho)
        self.lam = float(lam)
        self.cls_lr = None if cls_lr is None else float(cls_lr)
        self.eps = float(eps)
        self.max_coeff = None if max_coeff is None else float(max_coeff)
        self.prev_acc: dict[str, float] = {}
        self.step = 0
        self._pending: dict[str, float] = {}
        self._last: dict[str, float | torch.Tensor] = {}  # l_gm and cos/<m> stay tensors until ``log()``

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        """The heads at ``cls_lr`` without weight decay (the reference's ``cls_optimizer``); the rest."""
        heads = [p for p in model.heads.parameters() if p.requires_grad]
        owned = {id(p) for p in heads}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
        cls_lr = self.cls_lr if self.cls_lr is not None else 0.5 * base_lr
        groups = [{"name": "model", "params": rest, "lr": base_lr},
                  {"name": "heads", "params": heads, "lr": cls_lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        modalities = list(model.modalities)
        label = batch["label"]
        self._pending = {}
        detached = {m: out.features[m].detach() for m in modalities}
        parts: dict[str, torch.Tensor] = {"ce_fused": F.cross_entropy(out.fused, label)}
        training = model.training and torch.is_grad_enabled()
        if not training:
            for m in modalities:
                parts[f"ce_{m}"] = F.cross_entropy(model.heads[m](detached[m]), label)
            return torch.stack(list(parts.values())).sum(), log_parts(parts)

        # magnitude coefficients from the heads' accuracy change (before this step's update),
        # in float64 on the host as the reference: the step's one device sync
        with torch.no_grad():
            acc = torch.stack(
                [(out.unimodal[m].detach().argmax(dim=-1) == label).float().mean() for m in modalities]
            )
            acc = all_reduce_mean(acc).tolist()
        prev = [self.prev_acc.get(m, 0.0) for m in modalities]
        coeff = cggm_coefficients(acc, prev, self.eps, self.max_coeff)

        # direction term on detached features: trains heads and fusion only
        z = {m: detached[m].clone().requires_grad_(True) for m in modalities}
        fused_z = model.fusion(z)
        g_fusion = torch.autograd.grad(
            F.cross_entropy(fused_z, label), [z[m] for m in modalities], create_graph=True, allow_unused=True
        )
        cosines = []
        for i, m in enumerate(modalities):
            zm = detached[m].clone().requires_grad_(True)
            ce_m = F.cross_entropy(model.heads[m](zm), label)
            parts[f"ce_{m}"] = ce_m
            # no graph: L_gm must not reach the heads (the reference discards that gradient)
            (g_m,) = torch.autograd.grad(ce_m, [zm], retain_graph=True)
            g_f = g_fusion[i] if g_fusion[i] is not None else torch.zeros_like(g_m)
            cosines.append(F.cosine_similarity(g_f.reshape(-1), g_m.reshape(-1), dim=0, eps=1e-8))
        b = torch.tensor(coeff, dtype=cosines[0].dtype, device=cosines[0].device)
        l_gm = (b.abs().sum() - (b * torch.stack(cosines)).sum()) / len(modalities)
        loss = torch.stack(list(parts.values())).sum() + self.lam * l_gm
        parts["l_gm"] = l_gm

        self.prev_acc = {m: float(a) for m, a in zip(modalities, acc)}
        self.step += 1
        self._pending = {m: self.rho * c for m, c in zip(modalities, coeff)}
        parts = log_parts(parts)
        self._last = {"l_gm": parts["l_gm"]}
        for m, a, c, cs in zip(modalities, acc, coeff, cosines):
            self._last.update({f"acc/{m}": float(a), f"B/{m}": float(c), f"k/{m}": self.rho * c, f"cos/{m}": cs.detach()})
        return loss, parts

    @torch.no_grad()
    def after_backward(self, model: nn.Module, out: Any, batch: Mapping[str, Any]) -> None:
        pending, self._pending = self._pending, {}
        for m, k in pending.items():
            for p in model.encoders[m].parameters():
                if p.grad is not None:
                    p.grad.mul_(k)

    def log(self) -> dict[str, float]:
        return read_floats(self._last)

    def state_dict(self) -> dict[str, Any]:
        return {"prev_acc": dict(self.prev_acc), "step": self.step, "last": self.log()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prev_acc = {str(k): float(v) for k, v in dict(state.get("prev_acc", {})).items()}
        self.step = int(state.get("step", 0))
        self._last = {str(k): float(v) for k, v in dict(state.get("last", {})).items()}
