"""``write_report(runs, out)``: the comparison report of a folder of runs — report.html (figures
embedded), the PNGs themselves and summary.json (every run's row and every aggregated number)."""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import urllib.parse
from typing import Any

from experiments import aggregate as agg
from experiments import tables
from experiments.collect import Run, collect_runs, human_accuracy
from experiments.figures import FIGURES
from experiments.study import study

STD_NOTE = ("std: sample standard deviation (ddof=1) over the finished runs, n/a below 2; CI: t-based 95 % "
            "confidence interval of the mean")
CAPTIONS = {
    "imbalance.png": ("Modality imbalance: linear probes against unimodal controls",
                      "Per method (its late_linear runs when run), the linear-probe test accuracy of each modality's "
                      "frozen encoder (coloured bars) and the fused prediction's accuracy (grey), mean over runs with "
                      "t-based 95 % CIs. Dashed lines and bands: the probe accuracy of the same modality's encoder "
                      "trained alone (the unimodal control, method <m>_only), mean and CI. A multimodal encoder's "
                      "probe below its control's line is a modality the multimodal training left under-trained. "
                      "Dash-dotted line: the unimodal ensemble's fused accuracy (the two controls' softmax outputs "
                      "averaged), what fusing separately trained encoders reaches."),
    "accuracy.png": ("Test accuracy by method and fusion",
                     "Test accuracy of the fused prediction for every method (x axis) and fusion (bar colour), mean over "
                     "the finished runs of each setting (folds and seeds aggregated), error bars ± std. A small number "
                     "above a bar is its run count when below 5; the dotted line is chance."),
    "coefficients.png": ("Balancing coefficients",
                         "Per-step traces of each method's per-modality balancing coefficients (r, k, ratio, lr_scale, "
                         "alpha, weight: experiments/aggregate.py COEFFICIENTS; for MLB r: ratio, k: gradient "
                         "multiplier), per setting, mean over the method's runs of one fusion (late_linear when run) "
                         "with the min–max band. The last panel draws MLB's "
                         "rule k(r) = 1 + (β−1)·tanh(α(r−1)), β = β_max if r > 1 else 2, for each (α, β_max) used, "
                         "with the observed (r, k) pairs on top (x axis cut at the 99th percentile of r)."),
    "agreement.png": ("Agreement of the unimodal heads",
                      "Per method (late_linear fusion when run, else its first fusion; test clips summed over its "
                      "runs): the share of clips on which each unimodal head is right or wrong, and the fused model's "
                      "accuracy inside each cell — the fused model's use of the heads when they disagree."),
    "reliability.png": ("Calibration",
                        "Reliability diagrams of the fused prediction per method (same fusion choice): accuracy per "
                        "confidence bin, bins pooled over the method's runs, against the diagonal of perfect "
                        "calibration; red dots: the bin's mean confidence. ECE in each title is the mean over runs."),
    "human.png": ("Models next to human raters",
                  "Per setting: each method's audio head, visual head and fused test accuracy (mean over runs, "
                  "late_linear fusion when run) next to the CREMA-D crowd raters' voice-only, face-only and "
                  "audio-visual accuracy on the same test clips (hatched; averaged over the settings' test sets)."),
    "curves.png": ("Validation curves",
                   "Validation accuracy per epoch of the fused model, of each modality's head and, with a "
                   "decomposable fusion (late_linear), of each modality's additive share of the fused logits; mean over "
                   "the finished runs (folds/seeds) of each method with a ± std band; one row per setting. Joint "
                   "training does not train the heads (they stay near chance): its share curves show what the fused "
                   "classifier learnt from each modality."),
}
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f0f0f0}
td.l,th.l{text-align:left}tr.unfinished{color:#999}img{max-width:100%;border:1px solid #eee}
figure{margin:1em 0 2.5em}figcaption{max-width:60em;margin-top:0.4em}"""


def _rel(path: str, out: str) -> str:
    return os.path.relpath(path, os.path.abspath(out)).replace(os.sep, "/")


def run_row(run: Run, out: str, synthetic: bool = False) -> dict[str, Any]:
    """One run's line of the report: what it is, its test numbers (None while unfinished), links."""
    t = run.test or {}
    return {
        "id": run.id, "folder": run.path, "preset": run.preset, "split": run.split, "split_kind": run.split_kind,
        "setting": run.setting, "block": run.block, "method": run.method, "fusion": run.fusion, "seed": run.seed,
        "status": run.status, "epochs": run.epochs, "samples": t.get("samples"), "accuracy": t.get("accuracy"),
        "macro_f1": t.get("macro_f1"), "unimodal_accuracy": t.get("unimodal_accuracy", {}), "ece": t.get("ece"),
        "best_epoch": t.get("best_epoch"), "best_val_accuracy": t.get("best_val_accuracy"),
        "probe_accuracy": t.get("probe_accuracy", {}),
        # The tested model on its train part in evaluation mode, and in training mode over that
        # epoch: a gap means evaluation does not use what training learnt (train.precise_bn).
        "train_accuracy": t.get("train_accuracy"), "train_batch_accuracy": t.get("train_batch_accuracy"),
        "human": human_accuracy(run.shards, run.test_part) if run.finished and not synthetic else None,
        "config": _rel(os.path.join(run.path, "config.yaml"), out),
        "metrics": _rel(os.path.join(run.path, "metrics.jsonl"), out),
    }


def build_summary(runs: list[Run], runs_dir: str, out: str, figures: dict[str, str | None]) -> dict[str, Any]:
    """Everything the report shows, as JSON-able values."""
    methods = agg.by_method(runs)
    data = agg.data_by_setting(runs)
    curves = {}
    for setting in agg.settings(agg.finished(runs)):
        here = agg.by_method([r for r in runs if r.setting == setting])
        curves[setting] = {m: {"fusion": f, "runs": [r.id for r in g], "curves": agg.val_curves(g)} for m, (f, g) in here.items()}
    return {
        "generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "runs_dir": os.path.abspath(runs_dir),
        "n_runs": len(runs), "n_finished": len(agg.finished(runs)), "n_unfinished": len(runs) - len(agg.finished(runs)),
        "std": STD_NOTE,
        "data": data,
        "runs": [run_row(r, out, bool((data.get(r.setting) or {}).get("synthetic"))) for r in runs],
        "study": study(runs),
        "accuracy_table": agg.accuracy_table(runs),
        "human": agg.human_by_setting(runs),
        "heads_vs_human": agg.head_comparison(runs),
        "agreement": {m: {"fusion": f, "runs": [r.id for r in g], **(agg.agreement(g) or {})} for m, (f, g) in methods.items()},
        "reliability": {m: {"fusion": f, **(agg.reliability(g) or {})} for m, (f, g) in methods.items()},
        "mlb_rule": [{k: g[k] for k in ("alpha", "beta_max", "runs")} for g in agg.mlb_settings(agg.finished(runs))],
        "val_curves": curves,
        "figures": {name: (os.path.basename(p) if p else None) for name, p in figures.items()},
    }


def _finite(value: Any) -> Any:
    """NaN and infinities (not JSON) as None, everywhere in a JSON-able value."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _cells(values: list[str], tag: str = "td", left: int = 0) -> str:
    return "".join(f"<{tag}{' class=l' if i < left else ''}>{html.escape(v)}</{tag}>" for i, v in enumerate(values))


def _link(href: str, text: str) -> str:
    return f'<a href="{html.escape(urllib.parse.quote(href))}">{html.escape(text)}</a>'


def _mean_ci(stat: dict[str, Any]) -> str:
    """'62.3 [58.2, 66.4] (n=5)': mean and t-based 95 % CI (clipped to 0–100) from mean, std, n."""
    from scipy import stats as sps

    n, std = int(stat.get("n") or 0), stat.get("std")
    if stat.get("mean") is None:
        return ""
    if n < 3 or std is None:
        return f"{_pct(stat['mean'])} (n={n})"
    half = float(sps.t.ppf(0.975, n - 1)) * std / n ** 0.5
    lo, hi = max(0.0, stat["mean"] - half), min(1.0, stat["mean"] + half)
    return f"{_pct(stat['mean'])} [{_pct(lo)}, {_pct(hi)}] (n={n})"


def accuracy_tables_html(summary: dict[str, Any]) -> str:
    """Per setting: methods x fusions, 'mean [95 % CI] (n)' of the test accuracy in %."""
    parts = []
    for setting in dict.fromkeys(r["setting"] for r in summary["accuracy_table"]):
        rows = [r for r in summary["accuracy_table"] if r["setting"] == setting]
        fusions = agg.fusion_order(r["fusion"] for r in rows)
        human = summary["human"].get(setting)
        note = ("human raters: " + ", ".join(f"{p} {_pct(human[p])} %" for p in ("voice", "face", "audiovisual"))
                + f" ({human['clips']} clips)") if human else (
            "human raters: left out (synthetic data)" if (summary.get("data", {}).get(setting) or {}).get("synthetic")
            else "human raters: n/a (shards not found)")
        parts.append(f"<h3>{html.escape(setting)}</h3><p>{html.escape(note)}</p><table>"
                     f"<tr>{_cells(['method', *fusions], 'th', 1)}</tr>")
        for method in agg.method_order(r["method"] for r in rows):
            cells = [method]
            for fusion in fusions:
                r = next((r for r in rows if r["method"] == method and r["fusion"] == fusion), None)
                a = r and r["accuracy"]
                cells.append(_mean_ci(a) if r else "")
            parts.append(f"<tr>{_cells(cells, left=1)}</tr>")
        parts.append("</table>")
    return "\n".join(parts) or "<p>No finished run: nothing to aggregate.</p>"


def verdicts_html(summary: dict[str, Any]) -> str:
    """Per setting, the generated verdict (experiments/verdicts.py): the answer before the tables."""
    from experiments.verdicts import verdicts

    parts = []
    for setting, s in (summary.get("study") or {}).items():
        items = "".join(f"<li>{html.escape(line)}</li>" for line in verdicts(s))
        parts.append(f"<h3>{html.escape(setting)}</h3><ul>{items}</ul>")
    return "\n".join(parts) or "<p>No run with linear-probe accuracies: no verdict.</p>"


def study_html(summary: dict[str, Any]) -> str:
    """The study tables (tables.study_rows) per setting, as HTML."""
    parts = []
    for setting, s in (summary.get("study") or {}).items():
        parts.append(f"<h3>{html.escape(setting)}</h3>")
        for head, rows in tables.study_rows(s):
            parts.append(f"<table><tr>{_cells(head, 'th', 1)}</tr>")
            parts += [f"<tr>{_cells([c.replace('**', '') for c in r], left=1)}</tr>" for r in rows]
            parts.append("</table>")
    if not parts:
        return "<p>No run has linear-probe accuracies (runs from before the probes): no study table.</p>"
    return "\n".join([*parts, f"<p>{html.escape(tables.LEGEND)} {html.escape(tables.DIFF_LEGEND.replace('**bold**', 'bold'))}</p>"])


def data_html(summary: dict[str, Any]) -> str:
    """Per setting, one line saying what the runs were trained on."""
    items = [f"<li><b>{html.escape(k)}</b>: {html.escape(tables.describe_data(v).replace('`', ''))}</li>"
             for k, v in (summary.get("data") or {}).items()]
    return f"<ul>{''.join(items)}</ul>" if items else "<p>No finished run.</p>"


def runs_table_html(summary: dict[str, Any]) -> str:
    rows = summary["runs"]
    modalities = sorted({m for r in rows for m in r["unimodal_accuracy"]})
    probed = sorted({m for r in rows for m in r.get("probe_accuracy") or {}})
    head = ["id", "preset", "split", "method", "fusion", "seed", "status", "epochs", "test acc. %", "macro-F1",
            *[f"{m} head acc. %" for m in modalities], *[f"{m} probe acc. %" for m in probed],
            "train part, eval mode %", "train part, training mode %", "ECE", "best epoch (from 1)", "files"]
    out = [f"<table><tr>{_cells(head, 'th', 7)}</tr>"]
    for r in rows:
        values = [r["id"], r["preset"], r["split"], r["method"], r["fusion"], str(r["seed"]), r["status"],
                  str(r["epochs"]), _pct(r["accuracy"]), _num(r["macro_f1"]),
                  *[_pct(r["unimodal_accuracy"].get(m)) for m in modalities],
                  *[_pct((r.get("probe_accuracy") or {}).get(m)) for m in probed],
                  _pct(r.get("train_accuracy")), _pct(r.get("train_batch_accuracy")), _num(r["ece"]),
                  "n/a" if r["best_epoch"] is None else str(r["best_epoch"] + 1)]
        links = f"{_link(r['config'], 'config.yaml')} {_link(r['metrics'], 'metrics.jsonl')}"
        out.append(f"<tr class={r['status']}>{_cells(values, left=7)}<td class=l>{links}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def figure_html(name: str, path: str | None, missing: str = "nothing to draw for these runs") -> str:
    title, caption = CAPTIONS[name]
    if path is None:
        return (f"<h2>{html.escape(title)}</h2><p><i>{html.escape(name)}: {html.escape(missing)}.</i> "
                f"{html.escape(caption)}</p>")
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return (f"<h2>{html.escape(title)}</h2><figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(name)}\">"
            f"<figcaption><b>{html.escape(name)}.</b> {html.escape(caption)}</figcaption></figure>")


def _missing(name: str, summary: dict[str, Any]) -> str:
    data = summary.get("data") or {}
    if name == "human.png" and data and all(v.get("synthetic") for v in data.values()):
        return "left out: the runs are on synthetic data, whose clips have no human ratings"
    return "nothing to draw for these runs"


def render_html(summary: dict[str, Any], figures: dict[str, str | None]) -> str:
    head = (f"Generated {summary['generated']} from {summary['runs_dir']}: {summary['n_runs']} runs "
            f"({summary['n_finished']} finished, {summary['n_unfinished']} unfinished; unfinished runs are listed "
            f"but left out of every aggregate). {STD_NOTE}.")
    return "\n".join([
        "<!DOCTYPE html>", "<html lang=en><head><meta charset=utf-8><title>avbalance report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>avbalance report: modality balancing methods compared</h1>",
        "<h2>What the runs show</h2>", verdicts_html(summary),
        # The answer first: the verdicts, the figure they read from, then the tables.
        *[figure_html(name, path, _missing(name, summary)) for name, path in figures.items() if name == "imbalance.png"],
        f"<p>{html.escape(head)}</p>",
        "<h2>Data</h2>", data_html(summary),
        "<h2>Imbalance study: linear probes, unimodal controls, differences to joint</h2>",
        "<p>Each method's fused accuracy and each encoder's linear-probe accuracy (logistic regression on the frozen "
        "encoder's features of the train part, scored on the test part), the probe as a share of the unimodal "
        "control's, and every method minus joint paired over (split, seed).</p>",
        study_html(summary),
        "<h2>Accuracy by method and fusion</h2>",
        "<p>Test accuracy of the fused model in %, mean [t-based 95 % CI, clipped to 0–100] (n runs; fewer than 3: "
        "the mean only, no difference can be significant), per setting (sweep block, preset family "
        "and split kind: kfold1..K and vavl1..5 are aggregated).</p>",
        accuracy_tables_html(summary),
        *[figure_html(name, path, _missing(name, summary)) for name, path in figures.items() if name != "imbalance.png"],
        "<h2>Runs</h2>", "<p>Every run found, by setting, method and fusion; links point to its config.yaml and metrics.jsonl. "
        "epochs: epochs validated; best epoch counts from 1, as the progress lines do (metrics.jsonl and "
        "summary.json count from 0). Train part, eval mode: the tested checkpoint on its own train part in evaluation "
        "mode; training mode: its training batches' accuracy in that epoch. A large gap means evaluation does not use "
        "what training learnt (see train.precise_bn in docs/training.md).</p>",
        runs_table_html(summary),
        "</body></html>",
    ])


def write_report(runs: str, out: str) -> str:
    """Collect the runs under ``runs`` (recursively) and write the PNGs, report.html and
    summary.json into ``out``; returns the path of report.html. UserError when there is no run."""
    found = agg.run_order(collect_runs(runs))
    os.makedirs(out, exist_ok=True)
    figures: dict[str, str | None] = {}
    for name, draw in FIGURES.items():
        figures[name] = draw(found, out)
        stale = os.path.join(out, name)
        if figures[name] is None and os.path.exists(stale):
            os.remove(stale)  # left by an earlier report of other runs
    summary = build_summary(found, runs, out, figures)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(_finite(summary), fh, indent=1, allow_nan=False)
    path = os.path.join(out, "report.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render_html(summary, figures))
    return path
