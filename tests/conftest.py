"""Shared fixtures: a small synthetic CREMA-D corpus, built once per test session."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import pytest
from filelock import FileLock

# Tests never reach a network: a pretrained download would retry ~45 s, then fail.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AVBALANCE_QUIET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs the suite on every core (pytest -n auto): each worker gets its share of
    # them, for torch here and for the CLI processes it starts, instead of all of them each.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# After the environment above: the CLI server keeps it as the one its calls are forked under.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # as pytest does; also for the builder below
import cli_fork  # noqa: E402


@functools.cache
def _file_group(path: str) -> str | None:
    """The worker group of a test file's tests, from its text (xdist's scheduler runs in the
    controller, which never collects): "ray" for files that start Ray clusters (one at a time),
    the file itself for one with a fixture that outlives a test (built once, on one worker),
    else None: each test goes wherever a worker is free."""
    try:
        with open(os.path.join(REPO, path), encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    if 'xdist_group("ray")' in text:
        return "ray"
    if re.search(r"fixture\(scope=\"(module|class|package|session)\"", text):
        return path
    return None


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs on every core (``pytest -n auto``): tests are handed out one at a time,
    except that a file's tests sharing a fixture of their own, and all of Ray's, stay together
    (``_file_group``). The conftest's session fixtures are shared by the workers instead
    (``built_once``)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _file_group(nodeid.split("::")[0]) or nodeid

    return SharedFixtureScheduling(config, log)


def run_cli(*args: str, check: bool = False, env: dict[str, str] | None = None, cwd: str = REPO,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` as a user would, in a process of its own; return it finished.

    The process is forked from one that has imported the CLI's libraries already
    (tests/cli_fork.py), or started afresh where a fork could differ (``AVBALANCE_TEST_FORK=0``
    starts every one afresh)."""
    proc = cli_fork.run(list(args), dict(os.environ if env is None else env), cwd, timeout)
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


def built_once(tmp_path_factory, name: str, build) -> str:
    """``build(folder)`` once per test session, however many xdist workers ask for it.

    Under ``pytest -n`` every worker has its own session, so a session fixture would build its
    corpus once per worker. The first to ask builds into the run's shared temp folder under a
    file lock and marks it done last; the others wait for it and reuse it.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = str(tmp_path_factory.mktemp(name))
        build(folder)
        return folder
    folder = str(tmp_path_factory.getbasetemp().parent / name)  # the run's root, shared by its workers
    build_locked(folder, build)
    return folder


def build_locked(folder: str, build) -> None:
    with FileLock(folder + ".lock"):
        if not os.path.exists(os.path.join(folder, ".built")):
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way starts again
            os.makedirs(folder)
            build(folder)
            open(os.path.join(folder, ".built"), "w").close()


def _synth_corpus(folder: str) -> None:
    run_cli("synth", "cremad", "--out", os.path.join(folder, "corpus"), "--actors", "6", "--sentences", "1",
            "--seed", "7", check=True)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> str:
    """6 actors x 1 sentence x 6 emotions = 36 clips (kfold needs at least k+2 actors)."""
    return os.path.join(built_once(tmp_path_factory, "synth", _synth_corpus), "corpus")


def _train_shards(folder: str) -> None:
    corpus, out = os.path.join(folder, "corpus"), os.path.join(folder, "out")
    run_cli("synth", "cremad", "--out", corpus, "--actors", "6", "--sentences", "3", "--seed", "11",
            "--audio-signal", "1.0", "--video-signal", "1.0", check=True)
    run_cli("preprocess", "cremad", "--root", corpus, "--out", out, "--split", "kfold1", "--workers", "2",
            "--face-fps", "1", "--face-size", "224", "--allow-random-weights", check=True)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> str:
    """108 clips (6 actors x 3 sentences) with clear cues in both modalities, split kfold1:
    3 actors (54 clips) train, 1 validates, 2 (36 clips) test."""
    return os.path.join(built_once(tmp_path_factory, "train", _train_shards), "out", "shards", "kfold1")


# What the controller of ``pytest -n`` starts building before any worker asks (``built_once``).
SHARED_BUILDS = {"train": _train_shards, "synth": _synth_corpus}


def pytest_sessionstart(session) -> None:
    """Under ``pytest -n`` over the whole suite, the controller builds the shared corpus and
    shard set in a process of its own from the start, beside the workers, instead of one worker
    building them while another waits on its lock."""
    config = session.config
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return  # some tests were named: build only what they ask for, when they ask
    root = config._tmp_path_factory.getbasetemp()  # the workers' basetemps are folders in it
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tests.conftest as c; "
            "[c.build_locked(f'{sys.argv[2]}/{n}', c.SHARED_BUILDS[n]) for n in c.SHARED_BUILDS]")
    config._shared_build = subprocess.Popen([sys.executable, "-c", code, REPO, str(root)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session) -> None:
    proc = getattr(session.config, "_shared_build", None)
    if proc is not None and proc.poll() is None:
        proc.kill()  # the run stopped before a worker needed it
        proc.wait()
