"""``bench/gpu_check.py``'s smoke mode on the CPU: every item of the GPU check runs (or says why
it cannot), so the script is ready when a GPU is lent. It checks that the script works, and
what can be checked on a CPU (curves agree, the face features match across batch sizes), not
any speed. The whole smoke (every item, two minutes of CPU) runs in the slow suite; the fast one
runs two items through the same script."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from bench.tables import gpu_check_table
import cli_fork

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


def run(*args: str) -> subprocess.CompletedProcess:
    """``python bench/gpu_check.py ARGS`` in a process of its own (forked as run_cli's are)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "AVBALANCE_QUIET": "1"}
    return cli_fork.run(list(args), env, os.getcwd(), 900, script=SCRIPT)


SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("gpu_check")
    out = base / "gpu.json"
    proc = run("--device", "cpu", "--tiny", "--out", str(out), "--work", str(base / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@SLOW
def test_every_item_runs_or_says_why(smoke):
    items = smoke["items"]
    assert list(items) == ["corpus", "resnet_device", "resnet_loader_w0", "resnet_loader_w1", "conformer_w2v",
                           "bf16_vs_fp32", "compile", "jpeg_decode", "faces", "ddp"]
    assert smoke["mode"] == "tiny" and smoke["device_type"] == "cpu"
    for name, result in items.items():
        if name == "jpeg_decode":  # nvJPEG needs the GPU: skipped, with the reason
            assert result["status"] == "skipped" and "CUDA" in result["reason"], result
        else:
            assert result["status"] == "ok", (name, result)
        assert result["seconds"] >= 0
    for name in ("resnet_device", "resnet_loader_w0", "resnet_loader_w1", "conformer_w2v"):
        assert items[name]["samples_per_s"] > 0 and items[name]["gpu_busy_pct"] is None
        assert items[name]["gpu_busy_why"] == "not a GPU run"


@SLOW
def test_the_checks_that_a_cpu_can_make_hold(smoke):
    items = smoke["items"]
    # dynamo's eager backend runs the same kernels: the compiled curve is the eager one
    assert items["compile"]["max_moving_average_gap"] == 0.0 and items["compile"]["agree"]
    assert items["compile"]["first_loss"][0] == items["compile"]["first_loss"][1]
    assert items["bf16_vs_fp32"]["agree"], items["bf16_vs_fp32"]
    assert items["bf16_vs_fp32"]["first_loss"][0] != items["bf16_vs_fp32"]["first_loss"][1]  # bf16 did run
    # the face stages at two batch sizes on the CPU: the same features and boxes
    assert items["faces"]["equal_within_tolerance"] and items["faces"]["clips_candidate"] == 6, items["faces"]
    assert items["ddp"]["backend"] == "gloo" and 0.0 <= items["ddp"]["test_accuracy"] <= 1.0


@SLOW
def test_the_table_renders_and_says_it_is_no_gpu_figure(smoke):
    table = gpu_check_table(smoke)
    assert "**Not GPU figures**" in table
    for name in smoke["items"]:
        assert f"| {name} |" in table
    assert "Unmeasured" in gpu_check_table(None)


def test_chosen_items_run_and_the_table_shows_them(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run("--device", "cpu", "--tiny", "--only", "resnet_device,jpeg_decode", "--out", str(out),
               "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["items"]) == ["corpus", "resnet_device", "jpeg_decode"]  # the corpus is always built first
    assert result["items"]["resnet_device"]["status"] == "ok" and result["items"]["resnet_device"]["samples_per_s"] > 0
    assert result["items"]["jpeg_decode"]["status"] == "skipped" and "CUDA" in result["items"]["jpeg_decode"]["reason"]
    table = gpu_check_table(result)
    assert "**Not GPU figures**" in table and "| resnet_device |" in table and "| compile |" not in table


def test_refusals_write_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run("--device", "cpu", "--tiny", "--only", "resnet_device,warp_drive", "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown item(s) warp_drive") and not out.exists()
    import torch

    if not torch.cuda.is_available():
        proc = run("--device", "cuda", "--out", str(out))
        assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stderr and not out.exists()
