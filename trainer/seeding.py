"""Seeds and determinism: every random generator seeded, and kernels chosen to repeat or to be fast."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS repeats its results only with a fixed workspace (else, with warn_only, it warns)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    # cuDNN's autotuner picks the fastest convolution for each input shape, but by timing it, so
    # two runs may pick different algorithms (and round differently): only when a run need not
    # repeat exactly (train.deterministic=false).
    torch.backends.cudnn.benchmark = not deterministic
