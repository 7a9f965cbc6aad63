"""Shard sets at URLs (avbalance/remote.py), served by a real HTTP server on 127.0.0.1:
training from a URL gives the run training from the folder gives, a missing shard or an
unanswering server is a clear error naming it (never a hang), verify-shards checks a URL,
``pipe:`` and ``file://`` sets read like folders, and the shard cache keeps what it streamed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

from tests.conftest import run_cli

TINY = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
        "data.batch_size=8", "data.workers=2", "data.samples_per_epoch=16", "train.epochs=1", "train.patience=0"]


def squash(text: str) -> str:
    """Text without whitespace: error messages are wrapped to the terminal, URLs included."""
    return "".join(text.split())


@contextmanager
def http_server(root: str):
    """``python -m http.server`` serving ``root`` on a free port of 127.0.0.1; its base URL."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", root],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        port = int(line.split(" port ")[1].split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def silent_server():
    """A server that accepts connections (the kernel completes them) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextmanager
def stalling_server(root: str, stall: str):
    """Serves ``root``, but files whose name starts with ``stall`` stop half-way (headers and
    half their bytes sent, then silence): transfers that break mid-shard."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if not self.path.rsplit("/", 1)[-1].startswith(stall):
                return super().do_GET()
            with open(os.path.join(root, self.path.lstrip("/")), "rb") as fh:
                data = fh.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            release.wait(120)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def train(shards: str, out: str, *extra: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    sets = [a for s in TINY for a in ("--set", s)]
    return run_cli("train", "--config", "trainer/configs/resnet_joint.yaml", "--shards", shards, "--out", out,
                   *sets, *extra, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def weights_digest(run: str) -> str:
    """sha256 over the final model tensors (last.pt also records the shard location, which differs)."""
    state = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def numbers(run: str) -> dict:
    with open(os.path.join(run, "eval_test.json"), encoding="utf-8") as fh:
        metrics = json.load(fh)
    return {k: metrics[k] for k in ("samples", "accuracy", "macro_f1", "confusion", "unimodal_accuracy", "ece")}


def copy_set(train_shards: str, tmp_path) -> str:
    """A copy of the set in ``tmp_path/www/set`` (to damage); the server serves ``www``."""
    out = str(tmp_path / "www" / "set")
    shutil.copytree(train_shards, out)
    return out


def listed(shards: str, part: str) -> list[dict]:
    with open(os.path.join(shards, "shards.json"), encoding="utf-8") as fh:
        return json.load(fh)["parts"][part]["shards"]


@pytest.mark.slow
def test_training_from_a_url_gives_the_run_the_folder_gives(train_shards, tmp_path):
    local, url_run = str(tmp_path / "local"), str(tmp_path / "url")
    assert train(train_shards, local).returncode == 0
    with http_server(os.path.dirname(train_shards)) as base:
        url = f"{base}/{os.path.basename(train_shards)}"
        proc = train(url, url_run)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert numbers(url_run) == numbers(local)
        assert weights_digest(url_run) == weights_digest(local)
        with open(os.path.join(url_run, "config.yaml"), encoding="utf-8") as fh:
            assert f"shards: {url}" in fh.read()  # the run records the URL, not a mangled path
        # evaluate reads the run's own URL and reproduces the recorded numbers
        recorded = numbers(url_run)
        os.remove(os.path.join(url_run, "eval_test.json"))
        run_cli("evaluate", "--run", url_run, "--split", "test", check=True)
        assert numbers(url_run) == recorded


def test_a_missing_remote_shard_or_index_is_named(train_shards, tmp_path):
    shards = copy_set(train_shards, tmp_path)
    gone = listed(shards, "val")[0]["name"]
    os.remove(os.path.join(shards, gone))
    with http_server(str(tmp_path / "www")) as base:
        proc = train(f"{base}/set", str(tmp_path / "run"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert squash(f"{base}/set/{gone}") in squash(proc.stderr) and "missing" in proc.stderr
        proc = train(f"{base}/nothing", str(tmp_path / "run2"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert squash(f"no shards.json in {base}/nothing") in squash(proc.stderr)
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_a_server_that_never_answers_is_a_timeout_not_a_hang(tmp_path, monkeypatch):
    from avbalance import remote
    from avbalance.errors import UserError

    monkeypatch.setenv(remote.TIMEOUT_ENV, "1")
    with silent_server() as base:
        start = time.monotonic()
        with pytest.raises(UserError, match="no answer within 1 s"):
            remote.read_json(f"{base}/set/shards.json")
        assert time.monotonic() - start < 10  # the timeout, not a hang (a connect and a read at most)
        # through the CLI: the error names the file; a hang would run into the subprocess timeout
        proc = train(f"{base}/set", str(tmp_path / "run"), env={remote.TIMEOUT_ENV: "2"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert squash(f"{base}/set/shards.json") in squash(proc.stderr)
    assert "no answer within 2 s" in proc.stderr.replace("\n  ", " ")


def status_of(report: str) -> dict[str, str]:
    """verify-shards' lines ``STATUS PART NAME: DETAIL`` as {name: status}."""
    words = [line.split() for line in report.splitlines()]
    return {w[2].rstrip(":"): w[0] for w in words if len(w) > 2 and w[0] in ("ok", "missing", "size", "sha256", "unreadable")}


def test_a_transfer_that_stalls_mid_shard_is_named_not_a_hang(train_shards, tmp_path):
    """Every train shard stops half-way: the first one a loader worker reads is named (the
    size check before training passes: HEAD answers)."""
    with stalling_server(os.path.dirname(train_shards), "train-") as base:
        proc = train(f"{base}/{os.path.basename(train_shards)}", str(tmp_path / "run"), env={"AVBALANCE_REMOTE_TIMEOUT": "2"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert squash(f"damaged data in shard {base}/{os.path.basename(train_shards)}/train-") in squash(proc.stderr)
    assert "no answer within 2 s" in proc.stderr.replace("\n  ", " ")
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_verify_shards_checks_a_url(train_shards, tmp_path):
    shards = copy_set(train_shards, tmp_path)
    test_shards = listed(shards, "test")
    cut, flipped = test_shards[0]["name"], test_shards[1]["name"]
    os.truncate(os.path.join(shards, cut), 5000)
    with open(os.path.join(shards, flipped), "r+b") as fh:  # same size, one byte changed
        fh.seek(700)
        byte = fh.read(1)
        fh.seek(700)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with http_server(str(tmp_path / "www")) as base:
        sizes = run_cli("verify-shards", f"{base}/set")
        hashed = run_cli("verify-shards", f"{base}/set", "--hash")
        absent = run_cli("verify-shards", f"{base}/elsewhere")
    assert absent.returncode == 2 and "Traceback" not in absent.stderr
    assert squash(f"no shards.json in {base}/elsewhere") in squash(absent.stderr)
    assert sizes.returncode == 1 and hashed.returncode == 1
    assert status_of(sizes.stdout) == {**{s["name"]: "ok" for p in ("train", "val", "test") for s in listed(shards, p)},
                                       cut: "size"}
    assert status_of(hashed.stdout)[cut] == "size" and status_of(hashed.stdout)[flipped] == "sha256"
    n = sum(len(listed(shards, p)) for p in ("train", "val", "test"))
    assert f"{n - 2} of {n} shard(s) ok, 2 damaged; checked sizes and sha256" in hashed.stdout


def test_verify_shards_passes_an_intact_url_pipe_and_file_set(train_shards):
    n = sum(len(listed(train_shards, p)) for p in ("train", "val", "test"))
    with http_server(os.path.dirname(train_shards)) as base:
        over_http = run_cli("verify-shards", f"{base}/{os.path.basename(train_shards)}", "--hash")
    over_pipe = run_cli("verify-shards", f"pipe:cat {train_shards}/{{name}}", "--hash")
    over_file = run_cli("verify-shards", f"file://{train_shards}", "--hash")
    for proc in (over_http, over_pipe, over_file):
        assert proc.returncode == 0, proc.stderr
        assert f"{n} of {n} shard(s) ok, 0 damaged; checked sizes and sha256" in proc.stdout
        assert proc.stdout.count("sha256 ok") == n


def test_a_failing_pipe_command_is_named(train_shards, tmp_path):
    proc = run_cli("verify-shards", f"pipe:cat {tmp_path}/absent/{{name}}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "exitedwithstatus1" in squash(proc.stderr) and "absent/shards.json" in squash(proc.stderr)
    proc = run_cli("verify-shards", "pipe:cat shards.json")
    assert proc.returncode == 2 and "{name}" in proc.stderr


def test_the_shard_cache_keeps_a_streamed_shard_and_serves_it_offline(train_shards, tmp_path, monkeypatch):
    from avbalance import remote

    name = listed(train_shards, "test")[0]["name"]
    with open(os.path.join(train_shards, name), "rb") as fh:
        original = fh.read()
    cache = str(tmp_path / "cache")
    monkeypatch.setenv(remote.CACHE_ENV, cache)
    with http_server(os.path.dirname(train_shards)) as base:
        url = f"{base}/{os.path.basename(train_shards)}/{name}"
        assert len(original) // 2 > remote.DRAIN  # closing half-way leaves more than the tail it finishes
        with remote.open_stream(url) as fh:
            half = fh.read(len(original) // 2)
        assert half == original[: len(half)] and os.listdir(cache) == []  # left half-way: not kept
        with remote.open_stream(url) as fh:
            assert fh.read() == original
    assert os.listdir(cache) == [os.path.basename(remote.cache_path(url, cache))]
    with remote.open_stream(url) as fh:  # the server is gone: read from the cache
        assert fh.read() == original


def test_locations(tmp_path):
    from avbalance import remote
    from avbalance.errors import UserError

    assert remote.join("http://h:1/a/set/", "shards.json") == "http://h:1/a/set/shards.json"
    assert remote.join("pipe:curl -s http://h/set/{name}", "x.tar") == "pipe:curl -s http://h/set/x.tar"
    assert remote.join(str(tmp_path), "x.tar") == os.path.join(str(tmp_path), "x.tar")
    assert remote.canonical("s3://bucket/set/") == "s3://bucket/set"
    assert remote.canonical("set") == os.path.abspath("set")
    with pytest.raises(UserError, match="needs {name}"):
        remote.join("pipe:cat set.tar", "x.tar")
