"""The report's figures: one function per figure, each saves a PNG into ``out`` and returns its
path, or None when the runs give it nothing to draw. Numbers come from ``experiments.aggregate``."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments import aggregate as agg  # noqa: E402
from experiments import study as st  # noqa: E402
from experiments.collect import Run  # noqa: E402

DPI = 110
FEW = 5  # bars from fewer runs than this are annotated with n
PRESENTATION_BARS = (("voice", "audio only: audio head / voice-only raters", "#4c72b0"),
                     ("face", "visual only: visual head / face-only raters", "#dd8452"),
                     ("audiovisual", "audio-visual: fused model / audio-visual raters", "#55a868"))


def _colours(names: list[str]) -> dict[str, Any]:
    colours = plt.get_cmap("tab10")
    return {n: colours(i % 10) for i, n in enumerate(names)}


def _dashes(names: list[str]) -> dict[str, str]:
    """Solid lines for the first 10 names (one colour each), then dashed, then dotted."""
    return {n: ("-", "--", ":")[min(i // 10, 2)] for i, n in enumerate(names)}


def _grid(n: int, ncols: int, width: float, height: float) -> tuple[plt.Figure, list[plt.Axes]]:
    """n panels of width x height inches, ncols per row, unused cells removed."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.5, width * ncols), height * nrows + 0.6), layout="constrained",
                             squeeze=False)
    fig.get_layout_engine().set(w_pad=0.1, h_pad=0.08)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def _save(fig: plt.Figure, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _chance(runs: list[Run]) -> float | None:
    classes = {r.config.get("model", {}).get("n_classes") for r in runs}
    return 100.0 / classes.pop() if len(classes) == 1 and None not in classes else None


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _legend(fig: plt.Figure, handles: list[Any], title: str | None = None) -> None:
    """A legend below the panels, in as many columns as the figure's width holds."""
    widest = max(0.5 + 0.065 * len(h.get_label()) for h in handles)  # inches at fontsize 8
    ncol = max(1, min(len(handles), int(fig.get_figwidth() / widest)))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, title=title, fontsize=8, title_fontsize=8)


def _xticks(ax: plt.Axes, labels: list[str]) -> None:
    long = len(labels) > 6 or max((len(s) for s in labels), default=0) > 14
    ax.set_xticks(range(len(labels)), labels, rotation=35 if long else 0, ha="right" if long else "center",
                  rotation_mode="anchor")


def accuracy_figure(runs: list[Run], out: str) -> str | None:
    """Test accuracy by method (x) and fusion (bar colour), mean ± std, one panel per setting."""
    table = agg.accuracy_table(runs)
    if not table:
        return None
    colours = _colours(agg.fusion_order(r["fusion"] for r in table))
    panels = agg.settings(agg.finished(runs))
    n_methods = max(len({r["method"] for r in table if r["setting"] == s}) for s in panels)
    n_fusions = max(len({r["fusion"] for r in table if r["setting"] == s}) for s in panels)
    width = min(16.0, max(5.0, 0.35 * n_methods * (n_fusions + 1) + 1.5))
    fig, axes = _grid(len(panels), 1 if width > 8 else 2, width, 3.6)
    chance = _chance(agg.finished(runs))
    for ax, setting in zip(axes, panels):
        rows = [r for r in table if r["setting"] == setting]
        methods = agg.method_order(r["method"] for r in rows)
        fusions = agg.fusion_order(r["fusion"] for r in rows)
        bar = 0.8 / len(fusions)
        top = 0.0
        for j, fusion in enumerate(fusions):
            for r in (r for r in rows if r["fusion"] == fusion):
                x = methods.index(r["method"]) - 0.4 + bar * (j + 0.5)
                mean, std = 100 * r["accuracy"]["mean"], 100 * (r["accuracy"]["std"] or 0.0)
                ax.bar(x, mean, bar, yerr=std if r["n"] > 1 else None, color=colours[fusion], capsize=2,
                       error_kw={"elinewidth": 0.8})
                if r["n"] < FEW:
                    ax.text(x, mean + std + 1, str(r["n"]), ha="center", va="bottom", fontsize=7, color="#333")
                top = max(top, mean + std)
        if chance:
            ax.axhline(chance, color="grey", ls=":", lw=1)
        _xticks(ax, methods)
        ax.set_ylim(0, min(100, top * 1.15 + 5))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(setting)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colours[f], label=f) for f in colours]
    if chance:
        handles.append(Line2D([], [], color="grey", ls=":", label=f"chance ({chance:.1f} %)"))
    _legend(fig, handles, "fusion")
    fig.suptitle("Test accuracy by method and fusion (mean ± std)")
    return _save(fig, out, "accuracy.png")


def _trace_panel(ax: plt.Axes, traces: dict[str, dict[str, list]], colours: dict[str, Any]) -> None:
    values = []
    for modality, t in traces.items():
        ax.plot(t["steps"], t["mean"], color=colours[modality], lw=1.2)
        ax.fill_between(t["steps"], t["min"], t["max"], color=colours[modality], alpha=0.2, lw=0)
        values += t["min"] + t["max"]
    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and values and max(values) / min(values) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))


def _mlb_panel(ax: plt.Axes, groups: list[dict[str, Any]], colours: dict[str, Any]) -> list[Line2D]:
    """The rule k(r) for each (alpha, beta_max) run, with the observed (r, k) pairs on top."""
    from trainer.balancing.mlb import mlb_coefficients

    observed = [v for g in groups for rs in g["r"].values() for v in rs]
    r_max = max(3.0, float(np.percentile(observed, 99)) * 1.1 if observed else 3.0)
    grid = np.linspace(0.0, r_max, 300)
    handles = []
    for i, g in enumerate(groups):
        # With scores (1, r), modality 0's ratio is r: its coefficient is k(r).
        k = [float(mlb_coefficients([1.0, r], alpha=g["alpha"], beta_max=g["beta_max"])[0]) for r in grid]
        label = f"k(r), α={g['alpha']:g}, β_max={g['beta_max']:g}"
        handles += ax.plot(grid, k, color="black", ls=("-", "--", "-.", ":")[i % 4], lw=1.2, label=label)
        for m, rs in g["r"].items():
            ax.scatter(rs, g["k"][m], s=22, color=colours.get(m, "grey"), alpha=0.7, edgecolor="white", lw=0.4,
                       zorder=3)
    ax.axvline(1, color="grey", lw=0.6, ls=":")
    ax.axhline(1, color="grey", lw=0.6, ls=":")
    ax.set_xlim(0, r_max)
    ax.set_xlabel("r (mean of the other heads' scores / own score)")
    ax.set_ylabel("k (gradient multiplier)")
    ax.set_title("MLB: k as a function of r")
    return handles


def coefficients_figure(runs: list[Run], out: str) -> str | None:
    """Per setting, method and coefficient: the per-modality value over training steps (mean
    over runs, min–max band), plus MLB's rule k(r) with the observed pairs."""
    panels = []
    settings = agg.settings(agg.finished(runs))
    for setting in settings:
        where = f"{setting}: " if len(settings) > 1 else ""
        for method, (fusion, group) in agg.by_method([r for r in runs if r.setting == setting]).items():
            for name, traces in agg.coefficient_traces(group).items():
                panels.append((f"{where}{method} ({fusion}, {_runs(len(group))}): {name}", name, traces))
    mlb = [g for g in agg.mlb_settings(agg.finished(runs)) if g["r"]]
    if not panels and not mlb:
        return None
    modalities = sorted({m for _, _, t in panels for m in t} | {m for g in mlb for m in g["r"]})
    colours = _colours(modalities)
    fig, axes = _grid(len(panels) + bool(mlb), 3, 4.2, 3.0)
    for ax, (title, name, traces) in zip(axes, panels):
        _trace_panel(ax, traces, colours)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(f"{name} per modality")
    curves = _mlb_panel(axes[-1], mlb, colours) if mlb else []
    handles = [Line2D([], [], color=colours[m], lw=2, label=m) for m in modalities] + curves
    _legend(fig, handles)
    fig.suptitle("Balancing coefficients over training (mean over runs, band: min–max)")
    return _save(fig, out, "coefficients.png")


def agreement_figure(runs: list[Run], out: str) -> str | None:
    """Per method, the 2x2 agreement matrix of the unimodal heads, with the share of clips and
    the fused accuracy in each cell."""
    panels = [(m, f, len(g), a) for m, (f, g) in agg.by_method(runs).items() if (a := agg.agreement(g))]
    if not panels:
        return None
    fig, axes = _grid(len(panels), 4, 3.3, 3.0)
    image = None
    for ax, (method, fusion, n, a) in zip(axes, panels):
        rows, cols, cells = a["rows"], a["cols"], a["cells"]
        names = [["both_right", f"only_{rows}"], [f"only_{cols}", "both_wrong"]]
        share = np.array([[cells[n_]["share"] or 0.0 for n_ in row] for row in names])
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                cell = cells[names[i][j]]
                fused = "–" if cell["fused_accuracy"] is None else f"{100 * cell['fused_accuracy']:.0f} %"
                ax.text(j, i, f"{100 * share[i, j]:.0f} % of clips\nfused acc. {fused}", ha="center", va="center",
                        fontsize=8, color="white" if share[i, j] > 0.55 else "black")
        ax.set_xticks([0, 1], ["right", "wrong"])
        ax.set_yticks([0, 1], ["right", "wrong"])
        ax.set_xlabel(f"{cols} head")
        ax.set_ylabel(f"{rows} head")
        ax.set_title(f"{method} ({fusion})\n{a['clips']} clips, {_runs(n)}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of test clips")
    fig.suptitle("Agreement of the unimodal heads")
    return _save(fig, out, "agreement.png")


def reliability_figure(runs: list[Run], out: str) -> str | None:
    """Per method: pooled reliability diagram (accuracy per confidence bin) against the diagonal."""
    panels = [(m, f, rel) for m, (f, g) in agg.by_method(runs).items() if (rel := agg.reliability(g))]
    if not panels:
        return None
    fig, axes = _grid(len(panels), 4, 3.0, 3.1)
    for ax, (method, fusion, rel) in zip(axes, panels):
        bins = [b for b in rel["bins"] if b["count"]]
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins],
               [b["hi"] - b["lo"] for b in bins], color="#4c72b0", edgecolor="white", lw=0.5)
        ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=8, color="#c44e52", zorder=3)
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ece = rel["ece"]
        ax.set_title(f"{method} ({fusion})\nECE {ece['mean']:.3f} (mean of {_runs(ece['n'])})", fontsize=9)
    handles = [Patch(color="#4c72b0", label="accuracy in the bin"),
               Line2D([], [], marker="o", color="#c44e52", ls="", label="(mean confidence, accuracy)"),
               Line2D([], [], color="grey", ls="--", label="perfect calibration")]
    _legend(fig, handles)
    fig.suptitle("Reliability of the fused prediction")
    return _save(fig, out, "reliability.png")


def human_figure(runs: list[Run], out: str) -> str | None:
    """Per setting: each method's audio head, visual head and fused accuracy next to the human
    raters' voice-only, face-only and audio-visual accuracy on the same test clips."""
    human = agg.human_by_setting(runs)
    data = agg.data_by_setting(runs)
    # Synthetic clips borrow CREMA-D's names, not its raters: no comparison to draw there.
    heads = {k: v for k, v in agg.head_comparison(runs).items() if not data[k]["synthetic"]}
    if not heads:
        return None
    n_groups = max(len(m) for m in heads.values()) + 1
    width = max(5.0, 0.75 * n_groups + 1.5)
    fig, axes = _grid(len(heads), 1 if width > 8 else 2, width, 3.6)
    chance = _chance(agg.finished(runs))
    for ax, (setting, methods) in zip(axes, heads.items()):
        labels = list(methods) + ["human raters"]
        for j, (p, _, colour) in enumerate(PRESENTATION_BARS):
            for i, row in enumerate(methods.values()):
                value = row["fused"] if p == "audiovisual" else next(
                    (v for m, v in row["heads"].items() if agg.presentation(m) == p), None)
                if value is not None:
                    ax.bar(i - 0.27 + 0.27 * j, 100 * value, 0.27, color=colour)
            if human[setting] and human[setting][p] is not None:
                ax.bar(len(methods) - 0.27 + 0.27 * j, 100 * human[setting][p], 0.27, color=colour,
                       hatch="//", edgecolor="white")
        if not human[setting]:
            ax.text(len(methods), 2, "n/a", ha="center", va="bottom", fontsize=9)
        ax.set_xlim(-0.6, len(methods) + 0.6)
        if chance:
            ax.axhline(chance, color="grey", ls=":", lw=1)
        _xticks(ax, labels)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        clips = f", {human[setting]['clips']} clips rated" if human[setting] else ", human ratings n/a"
        ax.set_title(f"{setting}{clips}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=c, label=label) for _, label, c in PRESENTATION_BARS]
    handles.append(Patch(facecolor="white", edgecolor="grey", hatch="//", label="human raters (CREMA-D crowd)"))
    if chance:
        handles.append(Line2D([], [], color="grey", ls=":", label=f"chance ({chance:.1f} %)"))
    _legend(fig, handles)
    fig.suptitle("Model heads next to human raters")
    return _save(fig, out, "human.png")


def _ci_err(stat: dict[str, Any]) -> list[list[float]] | None:
    """Matplotlib's asymmetric yerr (in %) from a t interval, None without a CI."""
    if not stat.get("ci"):
        return None
    return [[100 * (stat["mean"] - stat["ci"][0])], [100 * (stat["ci"][1] - stat["mean"])]]


def imbalance_figure(runs: list[Run], out: str) -> str | None:
    """Per setting: each method's linear-probe accuracy per modality (bars, 95 % CI) against the
    unimodal controls' (dashed line, CI band, in the modality's colour), next to its fused
    accuracy (grey bar), with the unimodal ensemble's fused accuracy (dash-dotted line)."""
    found = st.study(runs)
    if not found:
        return None
    groups = max(len(s["controls"]) + len(s["methods"]) for s in found.values())
    width = min(16.0, max(5.5, 1.0 * groups + 2.0))
    fig, axes = _grid(len(found), 1 if width > 8 else 2, width, 3.8)
    modalities = list(dict.fromkeys(m for s in found.values() for m in (s["modalities"] or list(s["controls"]))))
    colours = _colours(modalities)
    chance = _chance(agg.finished(runs))
    for ax, (setting, s) in zip(axes, found.items()):
        mods = s["modalities"] or list(s["controls"])
        rows = [(c["method"], {m: c["probe"]}, c["fused"]) for m, c in s["controls"].items()]
        rows += [(r["method"], r["probe"], r["fused"]) for r in s["methods"]]
        bar = 0.8 / (len(mods) + 1)
        for i, (method, probes, fused) in enumerate(rows):
            bars = [(probes.get(m), colours[m]) for m in mods] + [(fused, "#8c8c8c")]
            for j, (stat, colour) in enumerate(bars):
                if stat and stat.get("mean") is not None:
                    x = i - 0.4 + bar * (j + 0.5)
                    ax.bar(x, 100 * stat["mean"], bar, yerr=_ci_err(stat), color=colour, capsize=2,
                           error_kw={"elinewidth": 0.8})
        for m, c in s["controls"].items():
            p = c["probe"]
            if p.get("mean") is None:
                continue
            ax.axhline(100 * p["mean"], color=colours[m], ls="--", lw=1.1)
            if p.get("ci"):
                ax.axhspan(100 * p["ci"][0], 100 * p["ci"][1], color=colours[m], alpha=0.12, lw=0)
        if chance:
            ax.axhline(chance, color="grey", ls=":", lw=1)
        ensemble = (s.get("ensemble") or {}).get("fused") or {}
        if ensemble.get("mean") is not None:  # what fusing the controls after training reaches
            ax.axhline(100 * ensemble["mean"], color="#444444", ls="-.", lw=1.1)
        _xticks(ax, [r[0] for r in rows])
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        n = sorted({r["n"] for r in s["methods"]} | {c["n"] for c in s["controls"].values()})
        ax.set_title(f"{setting} ({'/'.join(map(str, n))} runs per method)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colours[m], label=f"{m}: linear probe") for m in modalities]
    handles += [Line2D([], [], color=colours[m], ls="--", label=f"{m}: unimodal control's probe") for m in modalities]
    handles.append(Patch(color="#8c8c8c", label="fused prediction"))
    if any((s.get("ensemble") or {}).get("fused") for s in found.values()):
        handles.append(Line2D([], [], color="#444444", ls="-.", label="unimodal ensemble (fused)"))
    if chance:
        handles.append(Line2D([], [], color="grey", ls=":", label=f"chance ({chance:.1f} %)"))
    _legend(fig, handles)
    fig.suptitle("Probe accuracy per encoder vs its unimodal control (95 % CI)")
    return _save(fig, out, "imbalance.png")


def _span(axes: list[plt.Axes]) -> tuple[float, float]:
    lo = min(ax.get_ylim()[0] for ax in axes)
    hi = max(ax.get_ylim()[1] for ax in axes)
    return max(0.0, lo), min(100.0, hi)


def curves_figure(runs: list[Run], out: str) -> str | None:
    """Validation accuracy per epoch, fused and per head: one row per setting, one column per
    quantity, one line per method (mean over runs, band: ± std)."""
    rows = []
    for setting in agg.settings(agg.finished(runs)):
        here = [r for r in agg.finished(runs) if r.setting == setting]
        rows.append((setting, {m: (f, agg.val_curves(g)) for m, (f, g) in agg.by_method(here).items()}))
    quantities = sorted({q for _, ms in rows for _, c in ms.values() for q in c},
                        key=lambda q: (q != "accuracy", q.startswith("share"), q))
    if not quantities:
        return None
    names = agg.method_order(m for _, ms in rows for m in ms)
    colours, dashes = _colours(names), _dashes(names)
    ncols = min(3, len(quantities))
    per_setting = -(-len(quantities) // ncols) * ncols  # each setting starts on a new row
    fig, axes = _grid(len(rows) * per_setting, ncols, 4.0, 3.0)
    used = []
    for i, (setting, methods) in enumerate(rows):
        for j, q in enumerate(quantities):
            ax = axes[i * per_setting + j]
            used.append(ax)
            for method, (fusion, curves) in methods.items():
                if q not in curves:
                    continue
                c = curves[q]
                mean, std = 100 * np.array(c["mean"]), 100 * np.array(c["std"])
                ax.plot(c["epochs"], mean, color=colours[method], ls=dashes[method], lw=1.3,
                        marker="o" if len(mean) < 4 else None, ms=3)
                ax.fill_between(c["epochs"], mean - std, mean + std, color=colours[method], alpha=0.15, lw=0)
            if q == "accuracy":
                what = "fused model"
            elif q.startswith("share_accuracy_"):
                what = f"{q[len('share_accuracy_'):]}'s share of the fused logits"
            else:
                what = f"{q[len('accuracy_'):]} head"
            ax.set_title(f"{setting}\n{what}", fontsize=9)
            ax.set_xlabel("epoch (from 0)")
            ax.set_ylabel("validation accuracy (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    fusions = {m: {f for _, ms in rows for m_, (f, _) in ms.items() if m_ == m} for m in colours}
    handles = [Line2D([], [], color=colours[m], ls=dashes[m], lw=2,
                      label=f"{m} ({fusions[m].pop()})" if len(fusions[m]) == 1 else m)
               for m in colours]
    _legend(fig, handles, "method (fusion)")
    for ax in axes:
        if ax not in used:
            ax.set_visible(False)
    for ax in used:  # one scale for every panel
        ax.set_ylim(*_span(used))
    fig.suptitle("Validation accuracy over training (mean, band: ± std)")
    return _save(fig, out, "curves.png")


FIGURES: dict[str, Callable[[list[Run], str], str | None]] = {
    "imbalance.png": imbalance_figure,
    "accuracy.png": accuracy_figure,
    "coefficients.png": coefficients_figure,
    "agreement.png": agreement_figure,
    "reliability.png": reliability_figure,
    "human.png": human_figure,
    "curves.png": curves_figure,
}
