"""The numbers the report shows, computed once from the runs (figures draw them, summary.json
stores them). Only finished runs count; std is the sample std (ddof=1), None below 2 runs."""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from experiments.collect import Run, data_info, human_accuracy

METHOD_FIRST = ("joint", "multiloss", "mlb")
FUSION_ORDER = ("late_linear", "mid_mlp", "film", "gated", "tf")


def method_order(methods: Iterable[str]) -> list[str]:
    """The unimodal controls (``<m>_only``), joint, multiloss, mlb, then the others alphabetically."""
    methods = set(methods)
    controls = sorted(m for m in methods if m.endswith("_only"))
    first = controls + [m for m in METHOD_FIRST if m in methods]
    return first + sorted(methods - set(first))


def fusion_order(fusions: Iterable[str]) -> list[str]:
    fusions = set(fusions)
    return [f for f in FUSION_ORDER if f in fusions] + sorted(fusions - set(FUSION_ORDER))


def run_order(runs: Iterable[Run]) -> list[Run]:
    """Sorted by setting, method (report order), fusion (report order), split, seed and id."""
    runs = list(runs)
    methods = {m: i for i, m in enumerate(method_order(r.method for r in runs))}
    fusions = {f: i for i, f in enumerate(fusion_order(r.fusion for r in runs))}
    return sorted(runs, key=lambda r: (r.setting, methods[r.method], fusions[r.fusion], r.split, r.seed, r.id))


def finished(runs: Iterable[Run]) -> list[Run]:
    return [r for r in runs if r.finished]


def settings(runs: Iterable[Run]) -> list[str]:
    return sorted({r.setting for r in runs})


def sample_std(xs: list[float]) -> float | None:
    """The sample standard deviation (ddof=1); None below 2 values."""
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else None


def stats(values: Iterable[float | None]) -> dict[str, Any]:
    """mean, std (ddof=1) and n of the values that are not None; mean None when there is none,
    std None below 2 values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(xs)), "std": sample_std(xs), "n": len(xs)}


def accuracy_table(runs: list[Run]) -> list[dict[str, Any]]:
    """Per (setting, method, fusion): test accuracy, macro-F1, ECE and head accuracies over runs."""
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for r in finished(runs):
        groups[(r.setting, r.method, r.fusion)].append(r)
    rows = []
    for setting in settings(finished(runs)):
        in_setting = [k for k in groups if k[0] == setting]
        for method in method_order(k[1] for k in in_setting):
            for fusion in fusion_order(k[2] for k in in_setting if k[1] == method):
                group = groups[(setting, method, fusion)]
                modalities = sorted({m for r in group for m in r.test.get("unimodal_accuracy", {})})
                rows.append({
                    "setting": setting, "method": method, "fusion": fusion, "n": len(group),
                    "runs": [r.id for r in group],
                    "accuracy": stats(r.test.get("accuracy") for r in group),
                    "macro_f1": stats(r.test.get("macro_f1") for r in group),
                    "ece": stats(r.test.get("ece") for r in group),
                    "unimodal_accuracy": {m: stats(r.test.get("unimodal_accuracy", {}).get(m) for r in group)
                                          for m in modalities},
                })
    return rows


def by_method(runs: list[Run]) -> dict[str, tuple[str, list[Run]]]:
    """Method -> (its preferred fusion: late_linear if run, else the first in fusion order; its
    finished runs with that fusion, over every setting), in method order."""
    done = finished(runs)
    out = {}
    for method in method_order(r.method for r in done):
        fusion = fusion_order(r.fusion for r in done if r.method == method)[0]
        out[method] = (fusion, [r for r in done if r.method == method and r.fusion == fusion])
    return out


def agreement(runs: list[Run]) -> dict[str, Any] | None:
    """The unimodal heads' agreement cells summed over runs, with each cell's share of the clips
    and the fused accuracy inside it. Rows: the first modality's head right/wrong; columns: the second's."""
    cells: dict[str, list[int]] = {}
    for r in runs:
        for name, cell in (r.test.get("agreement") or {}).items():
            total = cells.setdefault(name, [0, 0])
            total[0] += int(cell["count"])
            total[1] += int(cell["fused_correct"])
    names = [n[len("only_"):] for n in cells if n.startswith("only_")]
    if len(names) != 2:
        return None
    clips = sum(c for c, _ in cells.values())
    return {
        "rows": names[0], "cols": names[1], "clips": clips, "runs": [r.id for r in runs],
        "cells": {name: {"count": c, "fused_correct": f, "share": c / clips if clips else None,
                         "fused_accuracy": f / c if c else None} for name, (c, f) in cells.items()},
    }


def reliability(runs: list[Run]) -> dict[str, Any] | None:
    """Confidence bins pooled over runs (count-weighted accuracy and confidence) and the runs' ECE."""
    tables = [r.test.get("reliability") or [] for r in runs]
    tables = [t for t in tables if t]
    if not tables:
        return None
    bins = []
    for i, first in enumerate(tables[0]):
        rows = [t[i] for t in tables if i < len(t)]
        count = sum(b["count"] for b in rows)
        acc = sum(b["count"] * b["accuracy"] for b in rows) / count if count else None
        conf = sum(b["count"] * b["confidence"] for b in rows) / count if count else None
        bins.append({"lo": first["lo"], "hi": first["hi"], "count": count, "accuracy": acc, "confidence": conf})
    return {"bins": bins, "ece": stats(r.test.get("ece") for r in runs), "runs": [r.id for r in runs]}


def _last_by(records: list[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
    """One record per value of ``key``, the last logged (a resumed run may log a step twice)."""
    return {r[key]: r for r in records if key in r}


def val_curves(runs: list[Run]) -> dict[str, dict[str, list]]:
    """Validation accuracy per epoch, fused (``accuracy``), per head (``accuracy_<m>``) and,
    for a decomposable fusion, per modality's share of the fused logits (``share_accuracy_<m>``):
    mean, std and n over the runs that reached each epoch."""
    per_run = [_last_by(r.kind("val"), "epoch") for r in runs]
    quantities = sorted({k for recs in per_run for rec in recs.values() for k in rec
                         if k.startswith("accuracy") or k.startswith("share_accuracy_")},
                        key=lambda k: (k != "accuracy", k.startswith("share"), k))
    out = {}
    for q in quantities:
        epochs = sorted({e for recs in per_run for e, rec in recs.items() if q in rec})
        values = [[recs[e][q] for recs in per_run if e in recs and q in recs[e]] for e in epochs]
        out[q] = {"epochs": epochs, "mean": [float(np.mean(v)) for v in values],
                  "std": [sample_std(v) or 0.0 for v in values], "n": [len(v) for v in values]}
    return out


# The per-modality values a method logs that scale or weight a modality's learning (the
# balancing coefficients), as opposed to its diagnostics (scores, cosines, accuracies): MLB's
# ratio r and multiplier k, OGM-GE's, AGM's and CGGM's k, PMR's ratio, MILES' and MSLR's
# learning-rate scale, MMPareto's weight alpha, the re-learning weight.
COEFFICIENTS = ("r", "k", "ratio", "lr_scale", "alpha", "weight")


def coefficient_traces(runs: list[Run]) -> dict[str, dict[str, dict[str, list]]]:
    """Per coefficient name (``k`` of ``k/audio``, one of ``COEFFICIENTS``) and modality: the
    value per training step, mean, min and max over the runs that logged that step."""
    per_run = [_last_by(r.kind("train"), "step") for r in runs]
    keys = sorted({k for recs in per_run for rec in recs.values() for k, v in rec.items()
                   if "/" in k and k.split("/", 1)[0] in COEFFICIENTS and isinstance(v, (int, float))})
    out: dict[str, dict[str, dict[str, list]]] = {}
    for key in keys:
        name, modality = key.split("/", 1)
        steps = sorted({s for recs in per_run for s, rec in recs.items() if key in rec})
        values = [[recs[s][key] for recs in per_run if s in recs and key in recs[s]] for s in steps]
        out.setdefault(name, {})[modality] = {
            "steps": steps, "mean": [float(np.mean(v)) for v in values],
            "min": [float(np.min(v)) for v in values], "max": [float(np.max(v)) for v in values]}
    return out


def mlb_settings(runs: list[Run]) -> list[dict[str, Any]]:
    """The MLB runs grouped by (alpha, beta_max) from their config (MLB's defaults when unset),
    with the observed (r, k) pairs of every logged step, per modality."""
    from trainer.balancing.mlb import MLB

    defaults = {k: p.default for k, p in inspect.signature(MLB.__init__).parameters.items() if k in ("alpha", "beta_max")}
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for r in runs:
        if r.method != "mlb":
            continue
        b = r.config.get("balancing") or {}
        key = (float(b.get("alpha", defaults["alpha"])), float(b.get("beta_max", defaults["beta_max"])))
        group = groups.setdefault(key, {"alpha": key[0], "beta_max": key[1], "runs": [], "r": {}, "k": {}})
        group["runs"].append(r.id)
        for rec in r.kind("train"):
            for m in r.modalities:
                if f"r/{m}" in rec and f"k/{m}" in rec:
                    group["r"].setdefault(m, []).append(float(rec[f"r/{m}"]))
                    group["k"].setdefault(m, []).append(float(rec[f"k/{m}"]))
    return [groups[k] for k in sorted(groups)]


def data_by_setting(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per setting: what its finished runs' shard sets were made from (``collect.data_info``):
    corpus, ``synthetic`` (True/False; None when unknown or mixed), the synth settings when
    they agree, ``face_weights_random`` (True when any set's face features are from random weights)."""
    out = {}
    for setting in settings(finished(runs)):
        infos = [data_info(s) for s in sorted({r.shards for r in finished(runs) if r.setting == setting and r.shards})]
        infos = [i for i in infos if i is not None]
        kinds = {i["synthetic"] for i in infos}
        synths = [i["synth"] for i in infos if i["synth"]]
        weights = {i["face_weights_random"] for i in infos} - {None}
        out[setting] = {"corpus": ", ".join(sorted({str(i["corpus"]) for i in infos})) or None,
                        "synthetic": kinds.pop() if len(kinds) == 1 else None,
                        "synth": synths[0] if synths and all(s == synths[0] for s in synths) else None,
                        "face_weights_random": (True in weights) if weights else None,
                        "shard_sets": len(infos)}
    return out


def human_by_setting(runs: list[Run]) -> dict[str, dict[str, Any] | None]:
    """Per setting: the raters' accuracy per presentation, averaged over the distinct test sets
    (shard folder, part) of its finished runs; None when no test set's shards can be read, and
    on synthetic data (its clips borrow CREMA-D's names, not its ratings)."""
    out = {}
    data = data_by_setting(runs)
    for setting in settings(finished(runs)):
        if data[setting]["synthetic"]:
            out[setting] = None
            continue
        test_sets = sorted({(r.shards, r.test_part) for r in finished(runs) if r.setting == setting and r.shards})
        found = [h for h in (human_accuracy(s, p) for s, p in test_sets) if h is not None]
        if not found:
            out[setting] = None
            continue
        out[setting] = {p: stats(h[p] for h in found)["mean"] for p in ("voice", "face", "audiovisual")}
        out[setting].update(test_sets=len(found), clips=sum(h["clips"] for h in found))
    return out


def presentation(modality: str) -> str | None:
    """The human presentation a model modality compares with: audio -> voice, visual -> face."""
    m = modality.lower()
    if any(w in m for w in ("audio", "voice", "speech", "wav", "spec")):
        return "voice"
    if any(w in m for w in ("visual", "video", "face", "frame", "vision")):
        return "face"
    return None


def head_comparison(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per setting and method (its preferred fusion within the setting): mean test accuracy of
    each unimodal head and of the fused model, over its finished runs."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for setting in settings(finished(runs)):
        here = [r for r in finished(runs) if r.setting == setting]
        out[setting] = {}
        for method, (fusion, group) in by_method(here).items():
            modalities = group[0].modalities
            row = {"fusion": fusion, "n": len(group), "fused": stats(r.test.get("accuracy") for r in group)["mean"]}
            row["heads"] = {m: stats(r.test.get("unimodal_accuracy", {}).get(m) for r in group)["mean"] for m in modalities}
            out[setting][method] = row
    return out
