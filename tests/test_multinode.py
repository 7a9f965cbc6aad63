"""Multi-node training as a cluster runs it: two torchrun agents (two "nodes" of one process
each, on this machine) meet over the c10d rendezvous at 127.0.0.1 and train from shards
served over HTTP. The run equals a one-node, two-process torchrun run on the local folder:
the same test numbers and the same final weights (the checks of the DDP tests, reused)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.conftest import REPO
from tests.test_every_method import TORCHRUN_ENV, check_ddp_run, torchrun_command, torchrun_train
from tests.test_remote_shards import http_server, numbers, weights_digest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_over_c10d_reading_shards_over_http_train_as_one_node_does(train_shards, tmp_path):
    local = str(tmp_path / "one_node")
    check_ddp_run(train_shards, local, torchrun_train(train_shards, local, "joint", "resnet", free_port()))
    out = str(tmp_path / "two_nodes")
    with http_server(os.path.dirname(train_shards)) as base:
        url = f"{base}/{os.path.basename(train_shards)}"
        launch = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "avbalance-test", "--local-addr", "127.0.0.1"]
        nodes = [subprocess.Popen(torchrun_command(url, out, "joint", "resnet", launch), cwd=REPO, env=TORCHRUN_ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        results = [node.communicate(timeout=900) for node in nodes]
        # one node's process is rank 0: it reports, writes the run and evaluates it
        reporter = next(i for i, (stdout, _) in enumerate(results) if "train: test accuracy" in stdout)
        proc = subprocess.CompletedProcess(nodes[reporter].args, nodes[reporter].returncode, *results[reporter])
        assert all(node.returncode == 0 for node in nodes), [err[-3000:] for _, err in results]
        assert sum("train: test accuracy" in stdout for stdout, _ in results) == 1
        check_ddp_run(train_shards, out, proc)  # evaluates through the CLI, from the run's URL
    assert numbers(out) == numbers(local)
    assert weights_digest(out) == weights_digest(local)
