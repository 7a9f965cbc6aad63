"""``cli.py report --summary FILE --check RUNS``: re-run runs against a committed summary's
numbers (planted run folders; the real re-run of a study seed is ``make study-check``,
tests/test_study_check.py in the slow suite)."""

from __future__ import annotations

import json
import os

import yaml

from experiments.reproduce import compare
from tests.conftest import run_cli

ROW = {"status": "finished", "accuracy": 0.75, "macro_f1": 0.74, "ece": 0.05, "best_epoch": 7,
       "best_val_accuracy": 0.70, "unimodal_accuracy": {"audio": 0.6, "visual": 0.3},
       "probe_accuracy": {"audio": 0.72, "visual": 0.41}}


def run_folder(root, run_id: str, test: dict) -> None:
    folder = os.path.join(root, *run_id.split("/"))
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump({"data": {"modalities": {"audio": "spec", "visual": "frames"}}, "balancing": {"name": "mlb"}}, fh)
    open(os.path.join(folder, "metrics.jsonl"), "w").close()
    with open(os.path.join(folder, "sweep_run.json"), "w", encoding="utf-8") as fh:
        json.dump({"id": run_id, "block": run_id.split("/")[0], "method": "mlb", "seed": 0}, fh)
    with open(os.path.join(folder, "eval_test.json"), "w", encoding="utf-8") as fh:
        json.dump({k: v for k, v in test.items() if k != "status"}, fh)


def test_same_numbers_pass_and_each_difference_is_named(tmp_path):
    summary = {"study": {}, "runs": [{"id": "a/mlb-late_linear/kfold1-s0", **ROW}, {"id": "a/mlb-late_linear/kfold1-s1", **ROW},
                        {"id": "a/mlb-late_linear/kfold1-s2", **ROW}]}  # s2 was not re-run: not checked
    runs = tmp_path / "runs"
    run_folder(runs, "a/mlb-late_linear/kfold1-s0", ROW)
    run_folder(runs, "a/mlb-late_linear/kfold1-s1", {**ROW, "probe_accuracy": {"audio": 0.72, "visual": 0.4107}})
    lines, problems = compare(summary, str(runs))
    assert lines[0] == "a/mlb-late_linear/kfold1-s0: same 9 numbers"
    assert lines[1] == "a/mlb-late_linear/kfold1-s1: DIFFERS in 1 of 9 numbers"
    assert problems == ["a/mlb-late_linear/kfold1-s1: probe_accuracy.visual: committed 0.41, re-run 0.4107"]
    # A margin for other hardware lets the small difference through.
    assert compare(summary, str(runs), tolerance=0.001)[1] == []

    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    proc = run_cli("report", "--summary", str(path), "--check", str(runs))
    assert proc.returncode == 2 and "1 number(s) differ from" in proc.stderr and "Traceback" not in proc.stderr
    assert "probe_accuracy.visual: committed 0.41, re-run 0.4107" in proc.stdout
    ok = run_cli("report", "--summary", str(path), "--check", str(runs), "--tolerance", "0.001", check=True)
    assert "every number of the 2 run(s)" in ok.stdout


def test_no_run_in_common_is_an_error_not_a_pass(tmp_path):
    runs = tmp_path / "runs"
    run_folder(runs, "b/mlb-late_linear/kfold1-s0", ROW)
    summary = {"study": {}, "runs": [{"id": "a/mlb-late_linear/kfold1-s0", **ROW}]}
    lines, problems = compare(summary, str(runs))
    assert lines == [] and len(problems) == 1 and "no finished run under" in problems[0]
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    proc = run_cli("report", "--summary", str(path), "--check", str(runs))
    assert proc.returncode == 2 and "no finished run under" in proc.stderr
