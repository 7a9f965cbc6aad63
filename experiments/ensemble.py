"""The unimodal ensemble (UME): the unimodal controls of one split and seed combined after
training, by averaging their softmax outputs clip by clip (Du et al., "On Uni-Modal Feature
Learning in Supervised Multi-Modal Learning", ICML 2023, who show that it matches or beats
many balancing methods). It costs no training: each run keeps its test-part logits
(``logits_<part>.npz``, trainer/predictions.py) and the report combines them.

Also the controls' complementarity: the share of clips that at least one control gets
right, the most any fusion of what the controls learnt could reach (an oracle that always
picks the right control).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from trainer.metrics import softmax


def aligned(members: Sequence[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and each member's logits on the clips every member has, in the first member's
    order. Members are ``{"clip_id", "label", "logits"}``; a clip whose label differs between
    members means they were not evaluated on the same data, and is an error."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    index = [{str(c): i for i, c in enumerate(m["clip_id"])} for m in members]
    common = [str(c) for c in members[0]["clip_id"] if all(str(c) in ix for ix in index[1:])]
    rows = [[ix[c] for c in common] for ix in index]
    labels = [np.asarray(m["label"])[r] for m, r in zip(members, rows)]
    if any(not np.array_equal(labels[0], other) for other in labels[1:]):
        raise ValueError("ensemble members disagree on the labels of the same clips: not the same evaluated part")
    return labels[0], [np.asarray(m["logits"], np.float64)[r] for m, r in zip(members, rows)]


def ensemble_scores(members: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float | int]:
    """``accuracy`` of the mean of the members' softmax outputs, ``oracle`` (share of clips at
    least one member gets right) and ``n`` (clips every member has)."""
    labels, logits = aligned(members)
    if len(labels) == 0:
        return {"accuracy": float("nan"), "oracle": float("nan"), "n": 0}
    probs = np.mean([softmax(x) for x in logits], axis=0)
    right = np.stack([x.argmax(axis=1) == labels for x in logits])
    return {"accuracy": float((probs.argmax(axis=1) == labels).mean()), "oracle": float(right.any(axis=0).mean()),
            "n": int(len(labels))}
