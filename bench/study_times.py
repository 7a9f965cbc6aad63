"""Per-run wall times of a sweep, from its ``sweep.json``: the mean seconds per method and block
(setting), as a markdown table, each method's time as a ratio to joint's in the same block
(the baseline measured in the same sweep), and the runs' total.

    python bench/study_times.py study/runs/sweep.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def table(records: list[dict]) -> list[str]:
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        if r.get("status") == "done" and r.get("seconds"):
            seconds[(r["method"], r["block"])].append(float(r["seconds"]))
    blocks = sorted({b for _, b in seconds})
    methods = list(dict.fromkeys(m for m, _ in seconds))
    head = ["method", *[f"{b}: mean s (n)" for b in blocks], *[f"{b}: / joint" for b in blocks]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    for m in methods:
        cells = []
        for b in blocks:
            xs = seconds.get((m, b))
            cells.append(f"{statistics.mean(xs):.1f} ({len(xs)})" if xs else "–")
        for b in blocks:
            xs, base = seconds.get((m, b)), seconds.get(("joint", b))
            cells.append(f"{statistics.mean(xs) / statistics.mean(base):.2f}" if xs and base else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    total = sum(sum(v) for v in seconds.values())
    lines += ["", f"{sum(len(v) for v in seconds.values())} finished runs, {total / 60:.1f} run-minutes in all."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_json", help="a sweep's sweep.json, e.g. study/runs/sweep.json")
    args = parser.parse_args()
    with open(args.sweep_json, encoding="utf-8") as fh:
        doc = json.load(fh)
    runs = doc["runs"]
    records = list(runs.values()) if isinstance(runs, dict) else runs
    print("\n".join(table(records)))


if __name__ == "__main__":
    main()
