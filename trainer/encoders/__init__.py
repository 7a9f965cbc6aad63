"""Encoders: each maps one modality's padded batch to features (B, out_dim).

Build one from a YAML-like mapping with ``ENCODERS.get(name)(**kwargs)``. Importing this
package imports every encoder family, so each registers itself here.
"""

from __future__ import annotations

from avbalance.registry import Registry

ENCODERS: Registry = Registry("encoder")

# Imported for their side effect (registration); they need ENCODERS defined above.
from trainer.encoders import face, resnet_encoders, wav2vec2  # noqa: E402,F401
from trainer.encoders.conformer import masked_mean  # noqa: E402

__all__ = ["ENCODERS", "masked_mean"]
