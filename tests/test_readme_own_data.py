"""The README's own-data commands, run as written (the `avbalance` console script, the preset
by name), in a fresh folder holding only ``my_videos/`` with its ``labels.csv``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from pipelines.synth.layouts import write_folder_corpus
from tests.conftest import REPO


def readme_block() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    match = re.search(r"<!-- own-data:begin -->\n```bash\n(.*?)```\n<!-- own-data:end -->", text, re.S)
    assert match, "README.md lost its own-data block"
    return match.group(1)


def test_the_block_uses_only_the_console_script():
    lines = [ln for ln in readme_block().replace("\\\n", " ").splitlines() if ln.strip()]
    assert lines and all(ln.startswith("avbalance ") for ln in lines)


@pytest.mark.slow
def test_the_readme_own_data_commands_run_as_written(tmp_path):
    write_folder_corpus(str(tmp_path / "my_videos"), classes=3, per_class=8, speakers=6, seconds=3.0)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for method in ("joint", "mlb"):
        result = json.load(open(tmp_path / "runs" / "mine" / method / "eval_test.json"))
        assert result["samples"] > 0 and 0 <= result["accuracy"] <= 1
    assert (tmp_path / "report" / "mine" / "report.html").exists()
    last = proc.stdout.strip().splitlines()[-3:]  # the report's short table ends the output
    assert last[-2].split()[0] == "joint" and last[-1].split()[0] == "mlb", proc.stdout[-2000:]
