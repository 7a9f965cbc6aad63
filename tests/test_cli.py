"""The CLI contract: every SPEC subcommand is listed and has --help."""

import pytest

from tests.conftest import run_cli

COMMANDS = ["synth", "manifest", "preprocess", "train", "evaluate", "sweep", "report", "export"]


def test_help_lists_every_subcommand():
    proc = run_cli("--help", check=True)
    for cmd in COMMANDS:
        assert cmd in proc.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help(cmd):
    proc = run_cli(cmd, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_unknown_corpus_is_refused_without_traceback(tmp_path):
    proc = run_cli("manifest", "voxceleb", "--root", str(tmp_path), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
