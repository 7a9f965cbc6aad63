"""Every benchmark script parses its own options: two merges once gave bench/preprocess.py
the same option twice, which only a run of the script showed."""

from __future__ import annotations

import glob
import os
import runpy
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = sorted(p for p in glob.glob(os.path.join(REPO, "bench", "*.py"))
                 if "__main__" in open(p, encoding="utf-8").read())


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_help_parses(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_study_times_averages_per_method_and_block_against_joint():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        from study_times import table
    finally:
        sys.path.pop(0)
    records = [{"method": "joint", "block": "a", "status": "done", "seconds": 60.0},
               {"method": "joint", "block": "a", "status": "done", "seconds": 62.0},
               {"method": "mlb", "block": "a", "status": "done", "seconds": 93.0},
               {"method": "mlb", "block": "a", "status": "done", "skipped": True},  # finished before: no time
               {"method": "mlb", "block": "a", "status": "failed", "seconds": 5.0}]
    lines = table(records)
    assert lines[2] == "| joint | 61.0 (2) | 1.00 |"
    assert lines[3] == "| mlb | 93.0 (1) | 1.52 |"
    assert lines[-1] == "3 finished runs, 3.6 run-minutes in all."
