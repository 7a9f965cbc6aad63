"""Run ``python cli.py ARGS`` for the tests, forked from a process that has already imported
what the CLI needs.

A test runs the real CLI in a process of its own, as a user does: its arguments, environment,
working folder, exit code, stdout and stderr are its own, and nothing it changes reaches the
test. A plain ``subprocess.run`` pays 2-5 s of imports (torch, the trainer, scikit-learn for the
probes, onnxscript, librosa's numba) before the command does any work; the suite starts about 240
such processes. Here one server process per pytest process imports them once; each call forks it,
and the child sets up the call's environment, working folder and standard streams and runs
``cli.py`` as ``__main__``, then exits as Python would (non-daemon threads joined, ``atexit``
handlers run, streams flushed).

A fork is not a fresh interpreter in one way: modules are imported before the call's environment
is applied. So a call whose environment differs from the server's in a variable that a library
reads when it loads (thread counts, ``PYTHON*``, Hugging Face, torch, CUDA, ...) runs as a plain
subprocess instead; so does a call made while another is in flight from the same process, and
every call when ``AVBALANCE_TEST_FORK=0``. The server never runs a torch operation, so no OpenMP
thread pool exists when it forks.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "cli.py")

# What the CLI's commands import when they run (cli.py imports its commands' modules lazily).
PRELOAD = (
    "cli", "torch", "torchvision", "numpy", "PIL.Image", "yaml", "webdataset", "av", "cv2", "h5py",
    "sklearn.linear_model", "sklearn.preprocessing", "sklearn.cluster", "scipy.signal", "scipy.stats",
    "torch.utils.tensorboard", "librosa", "librosa.filters", "numba", "onnxruntime", "onnxscript", "facenet_pytorch", "timm",
    "pipelines.config", "pipelines.runner", "pipelines.stages.audio", "pipelines.stages.faces",
    "pipelines.stages.face_features", "pipelines.stages.flow", "pipelines.stages.pack",
    "pipelines.recipes", "pipelines.synth.cremad", "pipelines.verify_shards", "pipelines.export_h5",
    "pipelines.coverage", "manifests.io", "trainer.config", "trainer.resume", "trainer.run_config",
    "trainer.loop", "trainer.evaluate", "trainer.probe", "experiments.engines", "experiments.sweep",
    "experiments.tables", "experiments.report", "experiments.reproduce", "experiments.figures",
)

# Environment variables that a library reads once, when it loads: a call that sets them otherwise
# than the server had them cannot be forked.
LOAD_TIME_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "NUMBA_", "PYTHON", "HF_", "TRANSFORMERS_",
                      "TORCH", "PYTORCH_", "CUDA_", "NCCL_", "LD_", "MPLBACKEND", "MPLCONFIGDIR", "LIBROSA_")


# ... but these are read when used: breakpoint() reads PYTHONBREAKPOINT at each call (pytest
# sets it while a test runs).
READ_WHEN_USED = {"PYTHONBREAKPOINT"}


def _load_time(name: str) -> bool:
    return name.startswith(LOAD_TIME_PREFIXES) and name not in READ_WHEN_USED


# ---------------------------------------------------------------------------------------------
# The server: ``python tests/cli_fork.py`` reads one JSON request per line on stdin.


def _exit_code(code: object) -> int:
    """What ``sys.exit(code)`` makes the process's exit status, as CPython does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_child(request: dict) -> int:
    """In the forked child: become the call's process, run cli.py as ``__main__``."""
    import runpy

    os.setsid()  # its own process group: a timeout kills it and whatever it started
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores it; the CLI handles Ctrl-C
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    # Streams as CPython opens them when none is a terminal: stdout block-buffered, stderr
    # line-buffered, both with the locale's encoding.
    sys.stdin = sys.__stdin__ = open(0, "r", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    script = request.get("script", CLI)
    sys.argv = [script, *request["argv"]]
    sys.path[0] = os.path.dirname(script)  # where `python SCRIPT` puts the script's folder
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:  # noqa: BLE001 - an uncaught error ends the process as Python would
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # joins non-daemon threads, as interpreter exit does
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def serve() -> None:
    """Import everything once, then fork a child per request; answer ``{"pid"}`` at once and
    ``{"status"}`` when the child ends."""
    import importlib

    sys.path[0] = REPO
    os.chdir(REPO)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional library missing here is imported by the child, if at all
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on pytest: the client ends us
    channel_in = sys.stdin.buffer
    channel_out = os.fdopen(os.dup(1), "wb")  # not inherited by what a child starts
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # what an import prints goes nowhere, not into the protocol
    channel_out.write(json.dumps({"ready": True, "env": dict(os.environ)}).encode() + b"\n")
    channel_out.flush()
    for line in channel_in:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                channel_out.close()
                code = _run_child(request)
            finally:
                os._exit(code)
        channel_out.write(json.dumps({"pid": pid}).encode() + b"\n")
        channel_out.flush()
        _, status = os.waitpid(pid, 0)
        channel_out.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        channel_out.flush()


# ---------------------------------------------------------------------------------------------
# The client, used by tests/conftest.py's run_cli.


class CliForker:
    """One server per pytest process, started on first use with ``base_env``: the environment
    the process had before any test ran (a test may change it for a while; the server must not
    keep that change for every later call)."""

    def __init__(self, base_env: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._env: dict[str, str] = dict(os.environ if base_env is None else base_env)
        self._loaded_env: dict[str, str] = {}  # the server's, once its imports were done
        self._broken = False
        self.last_pid: int | None = None  # the last call's process (and process group)
        self.log = os.environ.get("AVBALANCE_TEST_FORK_LOG")  # a line per call: forked, or why not

    def _start(self) -> bool:
        if self._proc is not None and self._proc.poll() is None:
            return True
        if self._broken:
            return False
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=self._env)
        ready = self._reply(600)
        if not ready or not ready.get("ready"):
            self._broken = True
            self.close()
            return False
        self._loaded_env = ready["env"]  # with what the libraries set when they loaded
        return True

    def _reply(self, timeout: float | None) -> dict | None:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        return json.loads(line) if line else None

    def why_not(self, env: dict[str, str]) -> str | None:
        """Why a call with ``env`` cannot be forked, or None when it can."""
        if os.environ.get("AVBALANCE_TEST_FORK", "1") == "0":
            return "AVBALANCE_TEST_FORK=0"
        if self._broken:
            return "the server did not start"
        for key in sorted(k for k in set(env) | set(self._env) if _load_time(k)):
            if env.get(key) == self._env.get(key):
                continue
            # A variable a library sets itself when it loads (torch: KMP_DUPLICATE_LIB_OK, ...),
            # already in the call's environment because the test process loaded it too.
            if key not in self._env and (not self._loaded_env or env.get(key) == self._loaded_env.get(key)):
                continue
            return f"{key} differs from the server's"
        return None

    def can_fork(self, env: dict[str, str]) -> bool:
        return self.why_not(env) is None

    def run(self, argv: list[str], env: dict[str, str], cwd: str, timeout: float,
            script: str = CLI) -> subprocess.CompletedProcess | None:
        """``python SCRIPT ARGV`` (cli.py, or another script of the repository such as
        bench/gpu_check.py) finished, or None when it cannot be forked (the caller runs a
        subprocess)."""
        if not self._lock.acquire(blocking=False):
            self._note(argv, "another call is in flight")
            return None
        try:
            reason = self.why_not(env)
            if reason is None and not self._start():
                reason = "the server did not start"
            reason = reason or self.why_not(env)  # now against what the server's libraries set
            self._note(argv, reason)
            if reason is not None:
                return None
            with tempfile.TemporaryDirectory(prefix="cli-fork-") as tmp:
                out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
                request = {"script": script, "argv": argv, "env": env, "cwd": cwd, "stdout": out, "stderr": err}
                assert self._proc is not None and self._proc.stdin is not None
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
                started = self._reply(60)
                if not started:
                    self._broken = True
                    raise RuntimeError("the CLI fork server did not answer")
                self.last_pid = started["pid"]
                done = self._reply(timeout)
                if done is None:  # as subprocess.run(timeout=...): kill it, then raise
                    try:
                        os.killpg(started["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self._reply(60)
                    raise subprocess.TimeoutExpired([sys.executable, script, *argv], timeout,
                                                    _read(out), _read(err))
                return subprocess.CompletedProcess([sys.executable, script, *argv], done["status"],
                                                   _read(out), _read(err))
        finally:
            self._lock.release()

    def _note(self, argv: list[str], reason: str | None) -> None:
        if self.log:
            with open(self.log, "a", encoding="utf-8") as fh:
                test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" ")[0]
                fh.write(f"{test}\t{' '.join(argv[:2])}\t{reason or 'forked'}\n")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            self._loaded_env = {}


# The one server of this process: pytest imports tests/conftest.py as ``conftest`` and test files
# import it again as ``tests.conftest``; both use this module, so both use this server. The
# conftest sets the suite's environment before it imports this module.
FORKER = CliForker()
atexit.register(FORKER.close)


def run(argv: list[str], env: dict[str, str], cwd: str, timeout: float,
        script: str = CLI) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGV`` in a process of its own, finished: forked by this process's
    server where it can be, else started afresh."""
    proc = FORKER.run(argv, env, cwd, timeout, script=script)
    if proc is None:
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)
    return proc


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


if __name__ == "__main__":
    serve()
