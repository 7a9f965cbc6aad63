"""Do re-run runs reproduce a committed summary? ``cli.py report --summary FILE --check RUNS``.

Every finished run under RUNS whose id (``<block>/<method>-<fusion>/<split>-s<seed>``) the
summary also lists is compared with the summary's row, number by number: the test accuracy,
macro-F1, ECE, the best epoch and its validation accuracy, each head's and each linear probe's
accuracy. On CPU, with the same command, corpus and thread count (the study's runs train with
one thread each: two at a time on two cores), a run repeats its numbers exactly, so any
difference is reported; ``tolerance`` allows a margin for other hardware.
"""

from __future__ import annotations

import math
from typing import Any

from experiments.collect import collect_runs

# The numbers of a summary's run row that a re-run must repeat (nested dicts compared per key).
FIELDS = ("accuracy", "macro_f1", "ece", "best_epoch", "best_val_accuracy", "unimodal_accuracy", "probe_accuracy")


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in FIELDS:
        value = row.get(field)
        if isinstance(value, dict):
            out.update({f"{field}.{k}": v for k, v in value.items()})
        else:
            out[field] = value
    return out


def _same(a: Any, b: Any, tolerance: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=tolerance)
    return a == b


def compare(summary: dict[str, Any], runs_dir: str, tolerance: float = 0.0) -> tuple[list[str], list[str]]:
    """(lines, problems): one line per checked run (``same`` or each differing number), and
    the differences alone. A summary run with no finished counterpart under ``runs_dir`` is
    not checked; none in common is a problem."""
    committed = {row["id"]: row for row in summary.get("runs", []) if row.get("status") == "finished"}
    lines: list[str] = []
    problems: list[str] = []
    checked = 0
    for run in collect_runs(runs_dir):
        if not run.finished or run.id not in committed:
            continue
        checked += 1
        want = _flat(committed[run.id])
        got = _flat(run.test)
        differ = [f"{key}: committed {want[key]!r}, re-run {got.get(key)!r}"
                  for key in sorted(want) if want[key] is not None and not _same(want[key], got.get(key), tolerance)]
        if differ:
            problems += [f"{run.id}: {d}" for d in differ]
            lines.append(f"{run.id}: DIFFERS in {len(differ)} of {len(want)} numbers")
            lines += [f"  {d}" for d in differ]
        else:
            lines.append(f"{run.id}: same {len(want)} numbers")
    if not checked:
        problems.append(f"no finished run under {runs_dir} is one of the summary's {len(committed)} runs (ids such as "
                        f"{next(iter(committed), '?')!r})")
    return lines, problems
