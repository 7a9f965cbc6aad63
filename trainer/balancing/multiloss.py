"""``multiloss``: CE on the fused logits plus CE on every unimodal head, unweighted."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from trainer.balancing.base import Balancer, cross_entropy_parts, log_parts, register


@register("multiloss")
class MultiLoss(Balancer):
    """Loss = CE(fused) + sum_m CE(unimodal_m); parts ``ce_fused`` and ``ce_<m>``."""

    unused_parameters = False  # every head has its CE term: each trainable parameter gets a gradient

    def compute_loss(
        self, model: nn.Module, batch: Mapping[str, Any], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts = cross_entropy_parts(out, batch["label"], unimodal=True)
        return loss, log_parts(parts)
