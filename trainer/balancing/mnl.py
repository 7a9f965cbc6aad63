"""``mnl``: Multimodal Negative Learning (Gong, Gao, Zhu, Hu & Cao, NeurIPS 2025, arXiv 2510.20877).

Checked against the authors' code, BaoquanGong/Multimodal-Negative-Learning
``train_latefusion.py`` (``model_forward``, the ``mode == 'train'`` branch, ``--weight1 0.7``).

Loss on every training batch, with p_m = softmax(head_m) and the fused prediction's most
likely wrong class j_b = argmax_{c != y_b} softmax(fused)[b, c]:

    xi_m(b)  = head_m[b, y_b] - head_m[b, j_b]           (margin of modality m on sample b)
    d(b)     = the modality with the largest margin (first in modality order on ties)
    w guided on b  iff  xi_d(b) > xi_w(b) and p_d(y_b | b) > p_w(y_b | b)
    G_w      = mean over the batch *and* the classes of
               mask_w(b) * [ -1[c = y_b] log p_w(c|b) - lambda q_d(c|b) log p_w(c|b)
                             + lambda 1[c = y_b] q_d(c|b) log p_w(c|b) ]
    L        = CE(fused) + sum_m CE(head_m) + sum_w G_w

with q_d = softmax(head_d) detached: on a guided sample the weak head gets its own CE
-log p_w(y) plus lambda times the dominant head's distribution over the *other* classes as a
soft target (the last term cancels the target column). lambda (``lam``) = 0.7, the
reference's ``weight1``; the mean over batch x classes is the reference's ``torch.mean``.
For two modalities this is the reference's pair of masks (t guides v when xi_t > xi_v and
p_t(y) > p_v(y), and the other way round).

Departures (also in docs/methods.md):

- M > 2: each modality is guided only by the largest-margin modality of that sample.
- Exact ties: the reference lets its second modality guide the first when both margins and
  both probabilities are equal; here nobody is guided on a tie.
- Outside training (the validation loss) the term is left out, as the reference's eval
  branch; ``log()`` gives ``nl/<m>`` (G_m) and ``weak/<m>`` (the share of the batch on which m
  was guided) of the last training step, kept in ``state_dict``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.base import cross_entropy_parts, log_parts, read_floats, register
from trainer.balancing.multiloss import MultiLoss


def guidance(fused: torch.Tensor, unimodal: Mapping[str, torch.Tensor], label: torch.Tensor,
             modalities: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the guiding modality's index (B,) and the guided mask (M, B), detached."""
    with torch.no_grad():
        rows = torch.arange(label.shape[0], device=label.device)
        wrong = fused.detach().float().softmax(-1).scatter(1, label.view(-1, 1), -1.0).argmax(-1)
        logits = torch.stack([unimodal[m].detach().float() for m in modalities])      # (M, B, C)
        margin = logits[:, rows, label] - logits[:, rows, wrong]                        # (M, B)
        prob = logits.softmax(-1)[:, rows, label]                                       # (M, B)
        dom = margin.argmax(0)                                                          # first on ties
        guided = (margin.gather(0, dom[None]) > margin) & (prob.gather(0, dom[None]) > prob)
    return dom, guided


def guided_term(weak_logits: torch.Tensor, dominant_logits: torch.Tensor, label: torch.Tensor,
                mask: torch.Tensor, lam: float) -> torch.Tensor:
    """mean_{b,c} mask_b [-1[c=y] log p_w - lam q_d log p_w + lam 1[c=y] q_d log p_w]."""
    log_p = weak_logits.float().log_softmax(-1)
    q = dominant_logits.detach().float().softmax(-1)
    onehot = torch.zeros_like(log_p).scatter(1, label.view(-1, 1), 1.0)
    per = -onehot * log_p - lam * q * log_p + lam * onehot * q * log_p
    return (per * mask.float()[:, None]).mean()


@register("mnl")
class MNL(MultiLoss):
    """Multi-loss CE plus per-sample guidance of the weaker head by the stronger one.

    ``log()`` gives ``nl/<m>`` and ``weak/<m>`` of the last training step.
    """

    requires = frozenset({"multimodal"})

    def __init__(self, lam: float = 0.7) -> None:
        super().__init__()
        if not lam >= 0:
            raise UserError(f"mnl: lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self._last: dict[str, torch.Tensor | float] = {}  # tensors until ``log()`` reads them

    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        label = batch["label"]
        loss, parts = cross_entropy_parts(out, label, unimodal=True)
        if not model.training:  # the reference's validation loss has no guidance term
            return loss, log_parts(parts)
        modalities = list(model.modalities)
        dom, guided = guidance(out.fused, out.unimodal, label, modalities)
        pairs = [(i, j) for i in range(len(modalities)) for j in range(len(modalities)) if j != i]
        masks = {(i, j): guided[i] & (dom == j) for i, j in pairs}
        # which (weak, guide) pairs have a guided sample: one device sync for all of them
        present = dict(zip(pairs, torch.stack([masks[p].any() for p in pairs]).tolist())) if pairs else {}
        last: dict[str, torch.Tensor] = {}
        for i, m in enumerate(modalities):
            term = loss.new_zeros(())
            for j, d in enumerate(modalities):
                if j != i and present[(i, j)]:
                    term = term + guided_term(out.unimodal[m], out.unimodal[d], label, masks[(i, j)], self.lam)
            loss = loss + term
            parts[f"nl_{m}"] = term
            last[f"weak/{m}"] = guided[i].float().mean()
        parts = log_parts(parts)
        self._last = {**last, **{f"nl/{m}": parts[f"nl_{m}"] for m in modalities}}
        return loss, parts

    def log(self) -> dict[str, float]:
        return read_floats(self._last)

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.log()} if self._last else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        last = state.get("last")
        self._last = {str(k): float(v) for k, v in dict(last).items()} if last else {}
