"""What a newcomer meets first: ``--help`` states every default, error messages never break a
flag or path across lines, the cheapest input is checked first, the install is free of
setuptools deprecation warnings, and the documented reading snippet runs without warnings."""

from __future__ import annotations

import argparse
import os
import re
import tomllib
import warnings

import pytest

from tests.conftest import REPO, run_cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every command, and every ``command corpus`` of the commands that take a corpus recipe."""
    import cli

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found[f"{prefix} {name}".strip()] = child
                    walk(f"{prefix} {name}", child)

    walk("", cli.build_parser())
    return found


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_help_states_every_default(command):
    for action in subcommands()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{command} {name} has no help text"
        if action.option_strings and not action.required and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, f"{command} {name}: the help does not state the default"


def test_error_messages_wrap_between_words_only():
    import cli

    message = ("the face features need EfficientNet-B2 weights: pass --face-weights FILE, or for tests and demos "
               "--allow-random-weights (recorded in shards.json) /a/rather/long/path/that/must/stay/whole.safetensors")
    text = cli.error_text(message)
    assert text.startswith("error: ") and max(len(ln) for ln in text.splitlines() if " " in ln.strip()) <= 100
    tokens = message.split()
    assert text.split() == ["error:", *tokens]  # every token whole, on one line


def test_preprocess_reports_a_mistyped_root_first(tmp_path):
    proc = run_cli("preprocess", "cremad", "--root", str(tmp_path / "corpsu"), "--out", str(tmp_path / "out"))
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "--root" in text and "is not a folder" in text and "weights" not in text, proc.stderr
    assert not (tmp_path / "out").exists()


def test_pyproject_license_is_an_spdx_expression():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        doc = tomllib.load(fh)
    assert isinstance(doc["project"]["license"], str)  # a table is deprecated by setuptools
    for path in doc["project"]["license-files"]:
        assert os.path.exists(os.path.join(REPO, path)), path
    assert any(r.startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77 for r in doc["build-system"]["requires"])


# webdataset leaves its tar files to the garbage collector (a ResourceWarning after the test),
# unrelated to what the snippet prints.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_documented_reading_snippet_runs_without_warnings(train_shards):
    with open(os.path.join(REPO, "docs", "shards.md"), encoding="utf-8") as fh:
        doc = fh.read()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "wds.WebDataset" in b)
    train = sorted(n for n in os.listdir(train_shards) if n.startswith("train-"))
    urls = os.path.join(train_shards, "train-{%s..%s}.tar" % (train[0][6:12], train[-1][6:12]))
    code = re.sub(r'"OUT/shards/ogm/train-\{[0-9.]+\}\.tar"', repr(urls), snippet)
    assert code != snippet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scope: dict = {}
        exec(compile(code, "docs/shards.md", "exec"), scope)  # noqa: S102 - the project's own documentation
    assert scope["feats"].shape[1] == 1408


@pytest.mark.parametrize("args, message", [
    (["preprocess", "cremad", "--root", "R", "--out", "O", "--face-fps", "-1"], "argument --face-fps: -1 is not allowed"),
    (["trian"], "invalid choice: 'trian'"),
    (["train", "--shards"], "argument --shards: expected one argument"),
])
def test_argparse_refusals_are_one_error_paragraph(args, message):
    proc = run_cli(*args)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in text, proc.stderr
    assert "usage:" not in proc.stderr and "--help`" in text and len(proc.stderr.splitlines()) <= 3


def test_the_console_script_names_itself_in_messages(tmp_path):
    """``avbalance`` (installed by ``[project.scripts]`` beside this interpreter) runs from any
    folder and suggests commands spelled ``avbalance ...``; ``cli.py`` spells them so they work
    with this interpreter."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "avbalance")
    assert os.path.exists(script), "the console script is not installed: `make install`"
    proc = subprocess.run([script, "train", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "run `avbalance preprocess` first" in text, proc.stderr
    assert not (tmp_path / "run").exists()
    from avbalance.invocation import detect

    spelled = detect(os.path.join(REPO, "cli.py"))
    assert spelled.split()[-1].endswith("cli.py")
    python = spelled.split()[0]
    assert python == "python" or os.path.realpath(python) == os.path.realpath(sys.executable)
