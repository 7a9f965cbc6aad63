"""Shared fixtures: a small synthetic CREMA-D corpus, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Tests never reach a network: a pretrained download would retry ~45 s, then fail.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AVBALANCE_QUIET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` as a user would; return the finished process."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "cli.py"), *args],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def _no_leaked_command_spelling(monkeypatch):
    """``cli.main`` records how it was started in AVBALANCE_PROG for its child processes; a test
    that calls it in-process must not hand its spelling to the next test's subprocesses."""
    monkeypatch.setenv("AVBALANCE_PROG", "")  # records the value before (or its absence) ...
    monkeypatch.delenv("AVBALANCE_PROG")  # ... and the test starts without one; undone after it


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(request, tmp_path_factory) -> str:
    """Exported face networks (inherited by CLI subprocesses) go to pytest's own cache folder,
    not ~/.cache: every run with the default backend needs them, and an export takes ~15 s, so
    later sessions reuse them (the file names hash the weights and the torch/onnx versions)."""
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    path = str(cache.mkdir("avbalance-cache") if cache is not None else tmp_path_factory.mktemp("avbalance-cache"))
    os.environ["AVBALANCE_CACHE_DIR"] = path
    return path


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> str:
    """6 actors x 1 sentence x 6 emotions = 36 clips (kfold needs at least k+2 actors)."""
    out = str(tmp_path_factory.mktemp("synth") / "corpus")
    run_cli("synth", "cremad", "--out", out, "--actors", "6", "--sentences", "1", "--seed", "7", check=True)
    return out


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> str:
    """108 clips (6 actors x 3 sentences) with clear cues in both modalities, split kfold1:
    3 actors (54 clips) train, 1 validates, 2 (36 clips) test."""
    base = tmp_path_factory.mktemp("train")
    corpus, out = str(base / "corpus"), str(base / "out")
    run_cli("synth", "cremad", "--out", corpus, "--actors", "6", "--sentences", "3", "--seed", "11",
            "--audio-signal", "1.0", "--video-signal", "1.0", check=True)
    run_cli("preprocess", "cremad", "--root", corpus, "--out", out, "--split", "kfold1", "--workers", "2",
            "--face-fps", "1", "--face-size", "224", "--allow-random-weights", check=True)
    return os.path.join(out, "shards", "kfold1")
