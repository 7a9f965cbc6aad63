"""The command a message tells the user to run, spelled the way this run was started, so it
works when pasted: ``avbalance ...`` under the console script (``[project.scripts]``), else
``python cli.py ...`` (with the interpreter's own path when ``python`` on PATH is another one,
e.g. the project's venv is not active).

``cli.main`` records the spelling in ``AVBALANCE_PROG``; loader workers, torchrun ranks,
sweep runs and Ray workers inherit it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

ENV = "AVBALANCE_PROG"
CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli.py")


def _short(path: str) -> str:
    """``path`` relative to the working folder when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def detect(argv0: str | None = None) -> str:
    """How this process was started: ``avbalance`` or ``[python|/path/to/python] cli.py``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) == "avbalance":
        return "avbalance"
    on_path = shutil.which("python")
    same = on_path is not None and os.path.realpath(on_path) == os.path.realpath(sys.executable)
    python = "python" if same else shlex.quote(_short(sys.executable))
    return f"{python} {shlex.quote(_short(CLI))}"


def prog() -> str:
    """The spelling recorded for this run (``detect()`` when none was)."""
    return os.environ.get(ENV) or detect()


def command(rest: str) -> str:
    """``prog() + " " + rest``: e.g. ``command("preprocess")`` -> ``avbalance preprocess``."""
    return f"{prog()} {rest}"
