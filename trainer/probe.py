"""Linear probes: how much each modality's encoder learnt, whatever the heads and the fusion did.

A linear probe freezes a trained encoder, takes its pooled features (the features the fusion
sees; model in eval mode, evaluation-time inputs without augmentation) on the train part,
fits a logistic regression on them and scores it on the test part. The modality-imbalance
literature uses it to measure how well encoder m learnt inside a multimodal model, against
the same encoder trained alone (OGM-GE, Peng et al. CVPR 2022, Fig. 1; MLB's motivation,
Kontras et al. BMVC 2024; Du et al., "On uni-modal feature learning in supervised multi-modal
learning", ICML 2023): a probe accuracy below the unimodal model's means joint training left
that modality under-trained. It is defined for every method, joint training included, whose
unimodal heads get no gradient.

The probe is fixed so that runs compare: features standardised with the train part's mean
and std, an L2-regularised multinomial logistic regression with ``C = PROBE_C`` fit by L-BFGS
for at most ``PROBE_MAX_ITER`` iterations (deterministic). It is fit on the features as stored
(float16, when they fit), so ``probe_<part>.npz`` in the run folder reproduces the accuracy.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Mapping

import numpy as np

PROBE_C = 0.1  # inverse L2 strength: a few hundred clips against 100s of feature dims
PROBE_MAX_ITER = 1000
FLOAT16_MAX = 6.0e4


def storable(x: np.ndarray) -> np.ndarray:
    """The features as they are stored: float16 when every value fits, else float32."""
    x = np.asarray(x, np.float32)
    return x.astype(np.float16) if x.size == 0 or np.abs(x).max() < FLOAT16_MAX else x


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 c: float = PROBE_C, max_iter: int = PROBE_MAX_ITER) -> float | None:
    """Test accuracy of a logistic regression fit on standardised train features; None when
    the test part is empty. With a single class in the train part it predicts that class."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(test_y) == 0 or len(train_y) == 0:
        return None
    if len(np.unique(train_y)) < 2:
        return float(np.mean(test_y == train_y[0]))
    scaler = StandardScaler().fit(np.asarray(train_x, np.float64))
    clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        # Not converging in max_iter is part of the fixed protocol, not an error.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(np.asarray(train_x, np.float64)), train_y)
    return float(np.mean(clf.predict(scaler.transform(np.asarray(test_x, np.float64))) == test_y))


def probe_accuracies(train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """Per modality, the probe's test accuracy. ``train``/``test``: ``{"label": y, m: X_m}``."""
    modalities = [m for m in train if m != "label"]
    return {m: linear_probe(storable(train[m]), train["label"], storable(test[m]), test["label"]) for m in modalities}


def save_features(path: str, parts: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """``{part: {"label": y, m: X_m}}`` as one npz (``<part>/<m>``, ``<part>/label``), no pickle."""
    arrays = {}
    for part, values in parts.items():
        for key, x in values.items():
            arrays[f"{part}/{key}"] = np.asarray(x, np.int64) if key == "label" else storable(x)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_features(path: str) -> dict[str, dict[str, np.ndarray]]:
    """What ``save_features`` wrote: ``{part: {"label": y, m: X_m}}``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for name in data.files:
            part, key = name.split("/", 1)
            out.setdefault(part, {})[key] = data[name]
    return out


def run_probes(collect: Callable[[str], dict[str, np.ndarray]], train_part: str, test_part: str,
               test: Mapping[str, np.ndarray] | None = None, out: str | None = None) -> dict[str, float | None]:
    """Probe accuracies of a model: ``collect(part)`` gives ``{"label": y, m: X_m}`` for a part
    (one evaluation pass); ``test`` reuses features already collected for ``test_part``.
    Writes ``out`` (``probe_<test part>.npz``) when given."""
    train = collect(train_part)
    test = dict(test) if test is not None else collect(test_part)
    if out:
        save_features(out, {"train": train, test_part: test})
    return probe_accuracies(train, test)
