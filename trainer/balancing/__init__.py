"""Modality-balancing methods: build one with ``build_balancer(name, model, **options)``.

The hook protocol and how each method plugs into the training loop: ``trainer.balancing.base``.
"""

from __future__ import annotations

from trainer.balancing.base import BALANCERS, Balancer, build_balancer, modality_param_groups

# Imported for their side effect (registration).
from trainer.balancing import (  # noqa: E402,F401
    agm, cggm, joint, miles, mlb, mmcosine, mmpareto, mnl, msam, mslr, multiloss, ogm_ge, pmr, relearning,
)
from trainer.balancing.mlb import mlb_coefficients, mlb_ratios  # noqa: E402

__all__ = [
    "BALANCERS", "Balancer", "build_balancer", "mlb_coefficients", "mlb_ratios", "modality_param_groups",
]
