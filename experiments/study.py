"""The imbalance study's numbers: linear-probe accuracy of every encoder against its unimodal
control, and every method against joint training, paired over (split, seed) with t-based
95 % confidence intervals.

Per setting (see ``Run.setting``), the unimodal controls are the finished one-modality runs
(method ``<m>_only``); every other method is compared with them and with ``joint``:

- ``fused``: test accuracy of the fused prediction;
- ``probe[m]``: linear-probe accuracy of encoder m (trainer/probe.py);
- ``fraction[m]``: probe[m] / the control's probe[m] of the same (split, seed);
- ``vs_joint``: the method minus joint on each of those, paired over (split, seed). The
  method *helps* on a metric only when the CI of the difference lies above 0;
- ``phenomenon[m]``: joint's probe[m] minus the control's, paired: below 0 (CI under 0) is
  the under-training of modality m that balancing methods exist to fix;
- ``ensemble``: the unimodal ensemble (UME, experiments/ensemble.py) of the controls of each
  (split, seed) — the mean of their softmax outputs — and ``oracle``, the share of test clips
  at least one control gets right; every multimodal method's ``vs_ensemble`` is its fused
  accuracy minus the ensemble's, paired. A method that cannot beat the ensemble gains nothing
  from training the modalities together. ``ensemble.vs_control[m]``: the ensemble minus control
  m's fused accuracy, paired (how much the modalities complement each other);
- ``coefficients``: per multimodal method, the per-step traces of its balancing coefficients
  (``aggregate.coefficient_traces``), for the coefficient table and figure of the setting.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from scipy import stats as sps

import os

from experiments import aggregate as agg
from experiments.collect import Run
from experiments.ensemble import ensemble_scores
from trainer.predictions import load_predictions

LEVEL = 0.95


def t_interval(values: Iterable[float | None]) -> dict[str, Any]:
    """mean, sample std (ddof=1), n and the t-based 95 % CI of the mean (None below 2 values)."""
    xs = np.array([float(v) for v in values if v is not None])
    out: dict[str, Any] = {"mean": float(xs.mean()) if len(xs) else None, "std": None, "n": int(len(xs)), "ci": None}
    if len(xs) >= 2:
        std = float(xs.std(ddof=1))
        half = float(sps.t.ppf(0.5 + LEVEL / 2, len(xs) - 1)) * std / np.sqrt(len(xs))
        out.update(std=std, ci=[out["mean"] - half, out["mean"] + half])
    return out


def paired_difference(a: dict[Any, float | None], b: dict[Any, float | None]) -> dict[str, Any]:
    """a − b over the keys both have a value for: t interval of the differences, the pairs
    used, and ``helps`` (CI above 0) / ``hurts`` (CI below 0); both False when the CI holds 0."""
    keys = sorted(k for k in set(a) & set(b) if a[k] is not None and b[k] is not None)
    out = t_interval(a[k] - b[k] for k in keys)
    ci = out["ci"]
    enough = out["n"] >= 3  # with 2 pairs the t interval exists, but no difference is called significant
    out.update(pairs=[list(k) for k in keys], helps=bool(enough and ci and ci[0] > 0), hurts=bool(enough and ci and ci[1] < 0))
    return out


def _key(run: Run) -> tuple[str, int]:
    return (run.split, run.seed)


def _per_key(runs: list[Run], value) -> dict[tuple[str, int], float | None]:
    """value(run) per (split, seed); the first run wins when a key repeats."""
    out: dict[tuple[str, int], float | None] = {}
    for r in runs:
        out.setdefault(_key(r), value(r))
    return out


def _probe(m: str):
    return lambda r: (r.test.get("probe_accuracy") or {}).get(m)


def _fused(r: Run) -> float | None:
    return r.test.get("accuracy")


def _values(runs: list[Run], modalities: list[str], control_probe: dict[str, dict]) -> dict[str, dict]:
    """Per (split, seed): ``fused``, ``probe/<m>`` and, where a control exists, ``fraction/<m>``
    (the probe over the control's probe of the same split and seed)."""
    out = {"fused": _per_key(runs, _fused)}
    for m in modalities:
        probe = out[f"probe/{m}"] = _per_key(runs, _probe(m))
        if m in control_probe:
            ref = control_probe[m]
            out[f"fraction/{m}"] = {k: v / ref[k] if v is not None and ref.get(k) else None for k, v in probe.items()}
    return out


def _predictions(run: Run) -> dict | None:
    path = os.path.join(run.path, f"logits_{run.test_part}.npz")
    return load_predictions(path) if os.path.exists(path) else None


def ensemble_of(controls: dict[str, list[Run]]) -> dict[str, Any] | None:
    """The controls' ensemble per (split, seed) where every control of that key kept its logits:
    accuracy and oracle as t intervals, and the per-key accuracies (for paired differences).
    None with fewer than two controls or no key they all have logits for."""
    if len(controls) < 2:
        return None
    by_key = {m: {_key(r): r for r in reversed(group)} for m, group in controls.items()}  # the first run wins
    keys = sorted(set.intersection(*(set(k) for k in by_key.values())))
    scores: dict[tuple[str, int], dict] = {}
    for key in keys:
        members = [_predictions(by_key[m][key]) for m in controls]
        if all(p is not None for p in members):
            try:
                found = ensemble_scores(members)
            except ValueError:  # the controls' logits are not of the same clips: no ensemble for this key
                continue
            if found["n"]:
                scores[key] = found
    if not scores:
        return None
    return {"members": sorted(r.method for g in controls.values() for r in g[:1]),
            "n": len(scores), "pairs": [list(k) for k in scores],
            "fused": t_interval(s["accuracy"] for s in scores.values()),
            "oracle": t_interval(s["oracle"] for s in scores.values()),
            "per_key": {k: s["accuracy"] for k, s in scores.items()}}


def setting_study(runs: list[Run]) -> dict[str, Any] | None:
    """The study of one setting's finished runs; None when no run has probe accuracies."""
    if not any(r.test.get("probe_accuracy") for r in runs):
        return None
    methods = agg.by_method(runs)
    controls: dict[str, dict[str, Any]] = {}
    control_probe: dict[str, dict] = {}
    control_runs: dict[str, list[Run]] = {}
    for method, (fusion, group) in methods.items():
        mods = group[0].modalities
        if len(mods) == 1 and mods[0] not in controls:
            m = mods[0]
            control_runs[m] = group
            control_probe[m] = _per_key(group, _probe(m))
            controls[m] = {"method": method, "fusion": fusion, "n": len(group), "runs": [r.id for r in group],
                           "fused": t_interval(_fused(r) for r in group), "probe": t_interval(control_probe[m].values())}
    multi = {k: v for k, v in methods.items() if len(v[1][0].modalities) > 1}
    modalities = list(dict.fromkeys(m for _, group in multi.values() for r in group for m in r.modalities))
    joint = multi.get("joint")
    base = _values(joint[1], modalities, control_probe) if joint else None
    ensemble = ensemble_of(control_runs)
    rows = []
    for method, (fusion, group) in multi.items():
        values = _values(group, modalities, control_probe)
        row: dict[str, Any] = {"method": method, "fusion": fusion, "n": len(group), "runs": [r.id for r in group],
                               "fused": t_interval(values["fused"].values()),
                               "probe": {m: t_interval(values[f"probe/{m}"].values()) for m in modalities},
                               "fraction": {m: t_interval(values[f"fraction/{m}"].values()) for m in modalities
                                            if m in control_probe}}
        if base is not None and method != "joint":
            row["vs_joint"] = {
                "fused": paired_difference(values["fused"], base["fused"]),
                "probe": {m: paired_difference(values[f"probe/{m}"], base[f"probe/{m}"]) for m in modalities},
                "fraction": {m: paired_difference(values[f"fraction/{m}"], base[f"fraction/{m}"]) for m in modalities
                             if m in control_probe}}
        if ensemble is not None:
            row["vs_ensemble"] = {"fused": paired_difference(values["fused"], ensemble["per_key"])}
        rows.append(row)
    phenomenon = {m: paired_difference(base[f"probe/{m}"], control_probe[m]) for m in modalities
                  if base is not None and m in control_probe}
    out = {"modalities": modalities, "controls": controls, "methods": rows, "phenomenon": phenomenon}
    if ensemble is not None:
        out["ensemble"] = {k: v for k, v in ensemble.items() if k != "per_key"}
        # How complementary the controls are: the ensemble against each control alone, paired.
        out["ensemble"]["vs_control"] = {m: paired_difference(ensemble["per_key"], _per_key(group, _fused))
                                         for m, group in control_runs.items()}
    traces = {method: {"fusion": fusion, "runs": [r.id for r in group], "traces": found}
              for method, (fusion, group) in multi.items() if (found := agg.coefficient_traces(group))}
    if traces:
        out["coefficients"] = traces
    return out


def study(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per setting (in order) with probe accuracies: ``setting_study`` of its finished runs."""
    out = {}
    for setting in agg.settings(agg.finished(runs)):
        found = setting_study([r for r in agg.finished(runs) if r.setting == setting])
        if found is not None:
            out[setting] = found
    return out
