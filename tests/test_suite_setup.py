"""The suite's own machinery (tests/conftest.py): which tests xdist keeps on one worker, and
the shared fixtures that every worker waits for instead of building again."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, _file_group


def test_files_with_their_own_lasting_fixture_or_ray_stay_together():
    assert _file_group("tests/test_report.py") == "tests/test_report.py"  # trained runs, module-scoped
    assert _file_group("tests/test_bad_input.py") == "tests/test_bad_input.py"
    assert _file_group("tests/test_engine_ray.py") == _file_group("tests/test_sweep_engines.py") == "ray"
    assert _file_group("tests/test_stage_graph.py") == "ray"
    assert _file_group("tests/test_trainer.py") is None  # only the shared shard set: tests go one by one
    assert _file_group("tests/no_such_file.py") is None


BUILD = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from tests.conftest import build_locked

def build(folder):
    with open(os.path.join(sys.argv[3], f"built-{os.getpid()}"), "w"):
        pass
    time.sleep(1.0)  # long enough for the other process to reach the lock
    with open(os.path.join(folder, "data"), "w") as fh:
        fh.write("x")

build_locked(sys.argv[2], build)
print(open(os.path.join(sys.argv[2], "data")).read())
"""


def test_a_shared_fixture_is_built_once_however_many_workers_ask(tmp_path):
    folder, marks = str(tmp_path / "shared"), tmp_path / "marks"
    marks.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, REPO, folder, str(marks)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["x\n", "x\n"]  # both see the whole build
    assert len(os.listdir(marks)) == 1  # one built it; the other waited and reused it
    assert os.path.exists(os.path.join(folder, ".built"))
