"""``joint``: plain joint training, cross-entropy on the fused logits only."""

from __future__ import annotations

from trainer.balancing.base import Balancer, register


@register("joint")
class Joint(Balancer):
    """Loss = CE(fused); parts ``ce_fused``. The unimodal heads get no gradient.

    The one method defined for a one-modality model (the unimodal controls).
    """

    min_modalities = 1
