"""Fusions: {modality: features (B, D_m)} -> fused logits (B, n_classes).

Build one with ``FUSIONS.get(name)(dims, n_classes, **kwargs)``; ``dims`` fixes the modality
order. Every fusion has ``decomposable``: True when its logits split exactly into
per-modality terms (``per_modality_logits``), as OGM-GE and MMCosine need.
"""

from __future__ import annotations

from avbalance.registry import Registry

FUSIONS: Registry = Registry("fusion")

# Imported for their side effect (registration); they need FUSIONS defined above.
from trainer.fusion import film, gated, gmu, late, mlp, transformer  # noqa: E402,F401
from trainer.fusion.base import Fusion  # noqa: E402

__all__ = ["FUSIONS", "Fusion"]
