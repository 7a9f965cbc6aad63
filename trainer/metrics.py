"""Evaluation metrics from collected logits: accuracy, macro-F1, per-modality accuracy,
ECE, the agreement table between unimodal heads and the fused prediction, confusion."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    out = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(out, (labels, preds), 1)
    return out


def macro_f1(conf: np.ndarray) -> float:
    tp = np.diag(conf).astype(float)
    precision = np.divide(tp, conf.sum(axis=0), out=np.zeros_like(tp), where=conf.sum(axis=0) > 0)
    recall = np.divide(tp, conf.sum(axis=1), out=np.zeros_like(tp), where=conf.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = conf.sum(axis=1) > 0  # classes absent from the labels do not count
    return float(f1[present].mean()) if present.any() else 0.0


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins, and the bins themselves
    (for reliability diagrams)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        acc = float(correct[inside].mean()) if n else 0.0
        mean_conf = float(conf[inside].mean()) if n else 0.0
        total += n / max(len(labels), 1) * abs(acc - mean_conf)
        table.append({"lo": float(lo), "hi": float(hi), "count": n, "accuracy": acc, "confidence": mean_conf})
    return float(total), table


def agreement(labels: np.ndarray, fused: np.ndarray, a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> dict:
    """The 4-way table: clips where both unimodal heads are right, only the first, only the
    second, or neither — with the count and the fused accuracy inside each cell."""
    ra, rb = a == labels, b == labels
    cells = {
        "both_right": ra & rb,
        f"only_{names[0]}": ra & ~rb,
        f"only_{names[1]}": ~ra & rb,
        "both_wrong": ~ra & ~rb,
    }
    return {
        name: {"count": int(m.sum()), "fused_correct": int((fused[m] == labels[m]).sum()),
               "fused_accuracy": float((fused[m] == labels[m]).mean()) if m.any() else None}
        for name, m in cells.items()
    }


def summarize(labels: np.ndarray, fused_logits: np.ndarray, unimodal_logits: dict[str, np.ndarray], n_classes: int,
              share_logits: dict[str, np.ndarray] | None = None) -> dict:
    """Every metric of the SPEC's list, as plain JSON-able values.

    ``share_logits`` (decomposable heads only): each modality's additive share of the fused
    logits; their accuracies are reported as ``share_accuracy``.
    """
    preds = fused_logits.argmax(axis=1)
    conf = confusion(labels, preds, n_classes)
    probs = softmax(fused_logits)
    ece_value, bins = ece(probs, labels)
    uni_preds = {m: l.argmax(axis=1) for m, l in unimodal_logits.items()}
    out = {
        "samples": int(len(labels)),
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "macro_f1": macro_f1(conf),
        "unimodal_accuracy": {m: float((p == labels).mean()) for m, p in uni_preds.items()},
        "ece": ece_value,
        "reliability": bins,
        "confusion": conf.tolist(),
    }
    if share_logits is not None:
        out["share_accuracy"] = {m: float((l.argmax(axis=1) == labels).mean()) if len(labels) else 0.0
                                 for m, l in share_logits.items()}
    names = list(uni_preds)
    if len(names) >= 2:
        out["agreement"] = agreement(labels, preds, uni_preds[names[0]], uni_preds[names[1]], (names[0], names[1]))
    return out
