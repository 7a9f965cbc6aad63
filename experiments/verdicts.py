"""The study's answer in sentences, generated from a setting's numbers (``study.setting_study``
in a report's summary.json), one finding per sentence, each citing its interval: what the
report page and the README open with, so no sentence about a result is written by hand.

Findings, in order: whether joint training under-trains a modality (its probe against the
unimodal control's); what imbalance costs in fused accuracy (joint against the unimodal
ensemble), how complementary the modalities are (the ensemble against the better control) and
the oracle; which methods change the fused accuracy against joint beyond their CI, and, when
joint falls short of the ensemble, which of them close that gap and which only narrow it; which
change only the encoders (a probe beyond its CI, the fused accuracy not); which methods beat
or fall below the ensemble. A difference counts only with at least ``MIN_RUNS`` pairs and a
95 % CI clear of 0; with fewer runs the verdict says that nothing can be significant.
"""

from __future__ import annotations

from typing import Any

from experiments.tables import MIN_RUNS


def _pts(stat: dict[str, Any]) -> str:
    """'+3.1 points [−0.5, +6.7] (n = 5)'."""
    text = f"{100 * stat['mean']:+.1f} points"
    if stat.get("ci"):
        text += f" [{100 * stat['ci'][0]:+.1f}, {100 * stat['ci'][1]:+.1f}]"
    return f"{text} (n = {stat['n']})"


def _clear(stat: dict[str, Any] | None) -> int:
    """+1 above 0, -1 below 0 beyond the CI (with enough pairs), 0 otherwise."""
    if not stat or stat.get("mean") is None or int(stat.get("n") or 0) < MIN_RUNS or not stat.get("ci"):
        return 0
    return 1 if stat["ci"][0] > 0 else -1 if stat["ci"][1] < 0 else 0


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def verdicts(s: dict[str, Any]) -> list[str]:
    """One sentence per finding for one setting of a summary's ``study``."""
    runs = [int(r.get("n") or 0) for r in s.get("methods", [])] + [int(c.get("n") or 0) for c in s.get("controls", {}).values()]
    if runs and max(runs) < MIN_RUNS:
        return [f"With {max(runs)} run(s) per method, no difference can be significant: the tables show means only."]
    out = []
    for m, p in (s.get("phenomenon") or {}).items():
        if p.get("mean") is None:
            continue  # joint and the control share no (split, seed): nothing to pair
        control = s["controls"][m]["method"]
        sign = _clear(p)
        if sign < 0:
            out.append(f"Joint training under-trains the {m} encoder: its linear probe differs from {control}'s by {_pts(p)}.")
        elif sign > 0:
            out.append(f"Joint training's {m} encoder probes better than {control}'s, by {_pts(p)}.")
        else:
            out.append(f"No under-training of the {m} encoder shows: joint − {control} probe {_pts(p)} (the CI holds 0"
                       f"{'' if int(p.get('n') or 0) >= MIN_RUNS else ', or too few pairs'}).")
    methods = {r["method"]: r for r in s.get("methods", [])}
    joint = methods.get("joint")
    ens = s.get("ensemble")
    versus = (ens or {}).get("vs_control") or {}
    controls = s.get("controls") or {}
    best = max((m for m in versus if m in controls and controls[m]["fused"].get("mean") is not None),
               key=lambda m: controls[m]["fused"]["mean"], default=None)
    if best is not None and versus[best].get("mean") is not None:
        name, diff = controls[best]["method"], versus[best]
        sign = _clear(diff)
        if sign > 0:
            out.append(f"The modalities complement each other: the unimodal ensemble beats the better control "
                       f"({name}) by {_pts(diff)}.")
        elif sign < 0:
            out.append(f"The unimodal ensemble falls below the better control ({name}), by {_pts(diff)}: "
                       f"averaging in the weaker control costs more than it adds.")
        else:
            out.append(f"The unimodal ensemble and the better control ({name}) do not differ beyond the CI: "
                       f"{_pts(diff)}.")
    if ens and joint and joint.get("vs_ensemble") and joint["vs_ensemble"]["fused"].get("mean") is not None:
        gap = joint["vs_ensemble"]["fused"]
        sign = _clear(gap)
        members = " + ".join(ens["members"])
        if sign < 0:
            out.append(f"Imbalance costs fused accuracy: joint training differs from the unimodal ensemble ({members}) by "
                       f"{_pts(gap)}.")
        elif sign > 0:
            out.append(f"Joint training beats the unimodal ensemble ({members}), by {_pts(gap)}.")
        else:
            out.append(f"Joint training and the unimodal ensemble ({members}) do not differ beyond the CI: {_pts(gap)}.")
        oracle = ens.get("oracle") or {}
        if oracle.get("mean") is not None:
            out.append(f"At least one unimodal control is right on {100 * oracle['mean']:.1f} % of test clips "
                       f"(n = {oracle['n']}): the most a fusion of what the controls learnt could reach.")
    compared = [r for r in s.get("methods", []) if r.get("vs_joint") and r["vs_joint"]["fused"].get("mean") is not None]
    if compared:
        def with_probes(r: dict[str, Any]) -> str:
            """'mlb (+2.7 points [...] (n = 5); visual probe +8.7 points [...] (n = 5))': the fused
            difference and every probe difference clear of its CI."""
            probes = [f"{m} probe {_pts(p)}" for m, p in r["vs_joint"].get("probe", {}).items() if _clear(p) != 0]
            return f"{r['method']} ({'; '.join([_pts(r['vs_joint']['fused']), *probes])})"

        better = [with_probes(r) for r in compared if _clear(r["vs_joint"]["fused"]) > 0]
        worse = [with_probes(r) for r in compared if _clear(r["vs_joint"]["fused"]) < 0]
        if better:
            out.append(f"Fused accuracy above joint beyond the CI: {_list(better)}.")
        if worse:
            out.append(f"Fused accuracy below joint beyond the CI: {_list(worse)}.")
        if not better and not worse:
            out.append(f"No method changes the fused accuracy against joint beyond its CI ({len(compared)} compared).")
        gap = (joint or {}).get("vs_ensemble", {}).get("fused")
        if ens and _clear(gap) < 0:
            # Joint falls short of the ensemble: which methods close that gap, which only narrow it.
            up = [r for r in compared if _clear(r["vs_joint"]["fused"]) > 0 and r.get("vs_ensemble")]
            closed = [f"{r['method']} ({_pts(r['vs_ensemble']['fused'])} against the ensemble)" for r in up
                      if _clear(r["vs_ensemble"]["fused"]) >= 0]
            narrowed = [f"{r['method']} ({_pts(r['vs_ensemble']['fused'])})" for r in up
                        if _clear(r["vs_ensemble"]["fused"]) < 0]
            if closed:
                out.append(f"Close the gap to the ensemble (above joint beyond the CI, not below the ensemble beyond "
                           f"it): {_list(closed)}.")
            if narrowed:
                out.append(f"Narrow the gap but stay below the ensemble beyond the CI: {_list(narrowed)}.")
            if not up:
                out.append("No method closes the gap between joint training and the ensemble beyond its CI.")
        encoders_only = []
        for r in compared:
            if _clear(r["vs_joint"]["fused"]) != 0:
                continue
            lifted = [f"{m} probe {_pts(p)}" for m, p in r["vs_joint"]["probe"].items() if _clear(p) > 0]
            if lifted:
                encoders_only.append(f"{r['method']} ({'; '.join(lifted)})")
        if encoders_only:
            out.append(f"Methods that change only the encoders (a probe above joint's beyond the CI, the fused accuracy "
                       f"not): {_list(encoders_only)}.")
    if ens:
        above = [f"{r['method']} ({_pts(r['vs_ensemble']['fused'])})" for r in s.get("methods", [])
                 if r.get("vs_ensemble") and r["method"] != "joint" and _clear(r["vs_ensemble"]["fused"]) > 0]
        below = [f"{r['method']} ({_pts(r['vs_ensemble']['fused'])})" for r in s.get("methods", [])
                 if r.get("vs_ensemble") and r["method"] != "joint" and _clear(r["vs_ensemble"]["fused"]) < 0]
        if above:
            out.append(f"Above the unimodal ensemble beyond the CI: {_list(above)}.")
        if below:
            out.append(f"Below the unimodal ensemble beyond the CI: {_list(below)}.")
    return out
