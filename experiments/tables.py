"""The study tables, rendered from a report's ``summary.json`` alone (no run folders needed):
GitHub markdown (``cli.py report --summary FILE --markdown``), HTML cells for report.html, the
short plain table ``report`` ends with, and the README blocks generated from committed summaries.

A README block is::

    <!-- study-table:begin docs/results/study/summary.json -->
    ...exactly what `python cli.py report --summary docs/results/study/summary.json --markdown` prints...
    <!-- study-table:end -->

``python -m experiments.tables README.md`` rewrites every block from its summary;
``python -m experiments.tables --check README.md`` exits 1 when one is stale.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from avbalance.errors import UserError
from avbalance.invocation import prog

BLOCK = re.compile(r"(<!-- study-table:begin (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- study-table:end -->)", re.S)
MIN_RUNS = 3  # below this, no interval is shown and no difference is called significant
LEGEND = ("Accuracies in %, mean [t-based 95 % CI] over runs (splits × seeds), the interval clipped to 0–100; "
          "n: runs; with fewer than 3 runs only the mean is shown: no difference can be significant. "
          "probe: linear-probe accuracy of the frozen encoder; / control: probe accuracy as % of the unimodal "
          "control's of the same split and seed (not clipped: a probe may beat its control).")
DIFF_LEGEND = ("Method minus joint, paired over (split, seed), in points (fractions: % of the control), "
               "mean [95 % CI]; **bold**: the CI excludes 0 (the method helps when positive, hurts when negative).")
ENSEMBLE_LEGEND = ("ensemble: the unimodal controls of the same split and seed combined after training (the mean of "
                   "their softmax outputs; UME, Du et al. ICML 2023); Δ fused vs ensemble: the method's fused accuracy "
                   "minus the ensemble's, paired. oracle: test clips at least one control gets right, the most a fusion "
                   "of what the controls learnt could reach.")


COEFFICIENT_LEGEND = ("Balancing coefficients over training: the mean over runs at each logged step, averaged over the "
                      "first, middle and last third of the steps, and the largest such mean. MLB: r_m > 1 means modality m "
                      "scores below the others, and k_m multiplies its encoder's and head's gradients; OGM-GE, AGM, "
                      "CGGM: k_m scales modality m's gradients; PMR: ratio_m, its prototype-score ratio; MILES, MSLR: "
                      "lr_scale_m scales its learning rate; MMPareto: alpha_m weighs its loss's gradient; "
                      "re-learning: alpha_m is the strength of its encoder's soft re-initialisation "
                      "(docs/methods.md).")


def load_summary(path: str) -> dict[str, Any]:
    """A report's summary.json; UserError when missing or not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            summary = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--summary {path}: cannot read a report summary ({err}); `{prog()} report` writes one") from None
    if not isinstance(summary, dict) or "study" not in summary:
        raise UserError(f"--summary {path}: no `study` section; write it again with this version's `{prog()} report`")
    return summary


def _few(stat: dict[str, Any]) -> bool:
    return int(stat.get("n") or 0) < MIN_RUNS


def pct(stat: dict[str, Any] | None, clip: bool = True) -> str:
    """'62.3 [58.2, 66.4]' (mean [95 % CI], in %; the interval clipped to 0–100 with ``clip``),
    '62.3 (n = 2)' with fewer than ``MIN_RUNS`` runs, '62.3' without a CI, '–' without a value."""
    if not stat or stat.get("mean") is None:
        return "–"
    mean = 100 * stat["mean"]
    if _few(stat) and stat.get("n"):
        return f"{mean:.1f} (n = {stat['n']})"
    if not stat.get("ci"):
        return f"{mean:.1f}"
    lo, hi = 100 * stat["ci"][0], 100 * stat["ci"][1]
    if clip:
        lo, hi = max(0.0, lo), min(100.0, hi)
    return f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"


_pct_full = pct


def diff(stat: dict[str, Any] | None, bold: str = "**") -> str:
    """'+3.1 [−0.5, +6.7]' in points; wrapped in ``bold`` when the CI excludes 0; '+3.1 (n = 2)'
    with fewer than ``MIN_RUNS`` pairs (never bold)."""
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{100 * stat['mean']:+.1f}"
    if _few(stat) and stat.get("n"):
        return f"{text} (n = {stat['n']})"
    if stat.get("ci"):
        text += f" [{100 * stat['ci'][0]:+.1f}, {100 * stat['ci'][1]:+.1f}]"
    return f"{bold}{text}{bold}" if stat.get("helps") or stat.get("hurts") else text


def describe_data(data: dict[str, Any] | None) -> str:
    """One line: what the runs were trained on."""
    if not data or data.get("synthetic") is None:
        what = f"corpus {data['corpus']}, synthetic or real unknown" if data and data.get("corpus") else "unknown data"
    elif data["synthetic"]:
        synth = data.get("synth") or {}
        knobs = ", ".join(f"{k} {v}" for k, v in sorted(synth.items()))
        what = "synthetic CREMA-D-shaped corpus (`cli.py synth`" + (f": {knobs}" if knobs else "") + "), not CREMA-D"
    else:
        what = f"real corpus ({data.get('corpus') or 'unknown'})"
    if data and data.get("face_weights_random"):
        what += "; face features from random weights"
    return what


def study_rows(s: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """The setting's tables as (header, rows) of plain strings: per-method numbers, differences
    to joint, and the phenomenon check (joint against the unimodal controls)."""
    mods = s["modalities"] or list(s["controls"])
    head = ["method", "n", "fused acc."]
    for m in mods:
        head += [f"{m} probe"] + ([f"{m} / {s['controls'][m]['method']}"] if m in s["controls"] else [])
    main = []
    for m, c in s["controls"].items():
        row = [c["method"], str(c["n"]), pct(c["fused"])]
        for m2 in mods:
            row += [pct(c["probe"]) if m2 == m else "–"] + (["(control)" if m2 == m else "–"] if m2 in s["controls"] else [])
        main.append(row)
    ens = s.get("ensemble")
    if ens:
        blank = ["–"] * (len(head) - 3)
        main.append([f"ensemble ({' + '.join(ens['members'])})", str(ens["n"]), pct(ens["fused"]), *blank])
        main.append([f"oracle ({' or '.join(ens['members'])})", str(ens["n"]), pct(ens["oracle"]), *blank])
    for r in s["methods"]:
        row = [r["method"], str(r["n"]), pct(r["fused"])]
        for m in mods:
            row += [pct(r["probe"].get(m))] + ([pct(r["fraction"].get(m), clip=False)] if m in s["controls"] else [])
        main.append(row)
    tables = [(head, main)]
    compared = [r for r in s["methods"] if "vs_joint" in r or "vs_ensemble" in r]
    if compared:
        with_ensemble = any("vs_ensemble" in r for r in compared)
        head = ["method − joint", "pairs", "Δ fused acc."] + (["Δ fused vs ensemble"] if with_ensemble else [])
        for m in mods:
            head += [f"Δ {m} probe"] + ([f"Δ {m} / control"] if m in s["controls"] else [])
        rows = []
        for r in compared:
            v = r.get("vs_joint") or {"fused": None, "probe": {}, "fraction": {}}
            n = (v["fused"] or (r.get("vs_ensemble") or {}).get("fused") or {}).get("n", "–")
            row = [r["method"], str(n), diff(v["fused"])]
            if with_ensemble:
                row.append(diff((r.get("vs_ensemble") or {}).get("fused")))
            for m in mods:
                row += [diff(v["probe"].get(m))] + ([diff(v["fraction"].get(m))] if m in s["controls"] else [])
            rows.append(row)
        tables.append((head, rows))
    if s["phenomenon"]:
        rows = [[m, f"joint − {s['controls'][m]['method']}", str(p["n"]), diff(p)] for m, p in s["phenomenon"].items()]
        tables.append((["modality", "phenomenon check", "pairs", "probe accuracy difference (points)"], rows))
    return tables


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(head))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _phase_means(steps: list[int], values: list[float]) -> list[float]:
    """Means of a trace over the first, middle and last third of its logged steps."""
    thirds: list[list[float]] = [[], [], []]
    for step, value in zip(steps, values):
        thirds[min(2, int(3 * (step - steps[0]) / max(1, steps[-1] - steps[0])))].append(value)
    return [sum(t) / len(t) if t else float("nan") for t in thirds]


def coefficient_rows(entries: dict[str, Any]) -> list[list[str]]:
    """Balancing coefficients per method and modality (``entries``: a setting's
    ``coefficients``, method -> {"runs", "traces"}): the mean over runs of each logged step,
    averaged over the first, middle and last third of training, and the largest value."""
    from experiments.aggregate import COEFFICIENTS

    rows = []
    for method, entry in (entries or {}).items():
        traces = entry.get("traces") or {}
        for name in COEFFICIENTS:
            for modality, trace in sorted((traces.get(name) or {}).items()):
                steps, mean = trace.get("steps") or [], trace.get("mean") or []
                if not steps:
                    continue
                phases = _phase_means(steps, mean)
                rows.append([method, f"{name}_{modality}", *[f"{v:.2f}" for v in phases], f"{max(mean):.2f}", str(len(entry["runs"]))])
    return rows


def markdown(summary: dict[str, Any]) -> str:
    """Every setting's study tables as GitHub markdown, from a summary alone (deterministic)."""
    study, data = summary.get("study") or {}, summary.get("data") or {}
    if not study:
        return "No run with linear-probe accuracies: no study table.\n"
    from experiments.verdicts import verdicts

    out = []
    for setting, s in study.items():
        out += [f"**{setting}** — data: {describe_data(data.get(setting))}.", ""]
        out += [f"- {line}" for line in verdicts(s)] + [""]
        for head, rows in study_rows(s):
            out += _markdown_table(head, rows) + [""]
        out += [LEGEND + (" " + DIFF_LEGEND if any("vs_joint" in r for r in s["methods"]) or s["phenomenon"] else "")
                + (" " + ENSEMBLE_LEGEND if s.get("ensemble") else ""), ""]
        # A summary from before coefficients were kept per setting has them once, for every setting.
        coefficients = coefficient_rows(s["coefficients"] if "coefficients" in s else summary.get("coefficients"))
        if coefficients:
            out += _markdown_table(["method", "coefficient", "first third", "middle third", "last third", "max", "runs"],
                                   coefficients)
            out += ["", COEFFICIENT_LEGEND, ""]
    return "\n".join(out)


def short_lines(summary: dict[str, Any]) -> list[str]:
    """A plain table for the terminal: fused and probe accuracy per modality per method
    (mean [95 % CI]; the mean alone with fewer than ``MIN_RUNS`` runs, as the title says)."""
    def pct(stat: dict[str, Any] | None) -> str:
        text = _pct_full(stat)
        return text.split(" (n = ")[0]

    lines = []
    for setting, s in (summary.get("study") or {}).items():
        mods = s["modalities"] or list(s["controls"])
        rows = [[c["method"], pct(c["fused"]), *[pct(c["probe"]) if m == cm else "–" for m in mods]]
                for cm, c in s["controls"].items()]
        if s.get("ensemble"):
            rows.append(["ensemble", pct(s["ensemble"]["fused"]), *["–"] * len(mods)])
        rows += [[r["method"], pct(r["fused"]), *[pct(r["probe"].get(m)) for m in mods]] for r in s["methods"]]
        head = ["method", "fused %", *[f"{m} probe %" for m in mods]]
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        few = any(_few(r["fused"]) for r in [*s["controls"].values(), *s["methods"]] if r.get("fused"))
        lines.append(f"{setting} (mean [95 % CI] over runs{'; fewer than 3 runs: the mean only' if few else ''}):")
        for row in [head, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return lines


def render_blocks(text: str, base: str) -> str:
    """``text`` with every study-table block regenerated from its summary (paths relative to ``base``)."""
    def fill(match: re.Match) -> str:
        summary = load_summary(os.path.join(base, match.group("path")))
        return match.group(1) + markdown(summary) + match.group(4)

    return BLOCK.sub(fill, text)


def blocks(text: str) -> list[tuple[str, str]]:
    """(summary path, body) of every study-table block in ``text``."""
    return [(m.group("path"), m.group("body")) for m in BLOCK.finditer(text)]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"] or ["README.md"]
    stale = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        new = render_blocks(text, os.path.dirname(os.path.abspath(path)))
        if new != text:
            stale.append(path)
            if not check:
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(new)
    verb = "stale" if check else "updated"
    print(f"study tables {verb}: {', '.join(stale) or 'none'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
