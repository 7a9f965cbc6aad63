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
