"""Bad settings are refused at once, by name: every numeric config key and ``--set`` value
against its range where the config is read, and the numeric options of synth, manifest,
preprocess and sweep. Nothing hangs (every command runs under a timeout) and nothing is
left behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from avbalance.errors import UserError
from tests.conftest import REPO, run_cli
from trainer.config import RULES, load_config

TIMEOUT = 60  # seconds: a refused value must answer at once, never hang


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=TIMEOUT)


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("setting, allowed", [
    ("data.batch_size=-3", ">= 1"),
    ("data.batch_size=0", ">= 1"),
    ("data.frames=0", ">= 1"),
    ("data.image_size=0", ">= 16"),
    ("data.workers=-1", ">= 0"),
    ("data.samples_per_epoch=0", ">= 1"),
    ("data.max_wav_seconds=0", "> 0"),
    ("optim.lr=0", "> 0"),
    ("optim.name=adagrad", "one of adam, adamw, sgd"),
    ("train.epochs=0", ">= 1"),
    ("train.log_every=0", ">= 1"),
])
def test_train_refuses_a_setting_out_of_range_at_once(tmp_path, setting, allowed):
    out = tmp_path / "run"
    proc = cli("train", "--config", os.path.join(REPO, "trainer", "configs", "resnet_joint.yaml"),
               "--shards", str(tmp_path / "no-shards-needed"), "--out", str(out), "--set", setting)
    key, value = setting.split("=")
    message = one_line(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # The settings are checked before anything else (here: before the missing shards).
    assert f"error: {key} = " in message and value in message and allowed in message, message
    assert not out.exists()


@pytest.mark.parametrize("key", sorted(RULES))
def test_every_ruled_key_refuses_a_wrong_value(key):
    rule = RULES[key]
    bad = "nope" if rule.choices else (rule.lo - 1 if rule.lo is not None else rule.hi + 1)
    with pytest.raises(UserError, match=f"^{key} = .* must be "):
        load_config(None, [f"{key}={bad}"])


def test_every_preset_is_within_range():
    configs = os.path.join(REPO, "trainer", "configs")
    for name in sorted(os.listdir(configs)):
        if name.endswith(".yaml") and not name.endswith("_base.yaml"):
            load_config(os.path.join(configs, name))  # raises if a preset breaks a rule


@pytest.mark.parametrize("command, option, value, allowed", [
    ("preprocess", "--face-fps", "-1", "> 0"),
    ("preprocess", "--face-fps", "0", "> 0"),
    ("preprocess", "--face-detect-fps", "-2", "> 0"),
    ("preprocess", "--workers", "0", ">= 1"),
    ("preprocess", "--batch-size", "0", ">= 1"),
    ("preprocess", "--face-min-size", "-5", ">= 1"),
    ("preprocess", "--face-margin", "-0.5", ">= 0"),
    ("preprocess", "--face-size", "100", "choose from 260, 224"),
    ("preprocess", "--shard-samples", "0", ">= 1"),
    ("preprocess", "--shard-mb", "0.5", ">= 1"),
    ("preprocess", "--min-shards", "0", ">= 1"),
    ("synth", "--actors", "0", ">= 1"),
    ("synth", "--sentences", "13", "<= 12"),
    ("synth", "--workers", "-1", ">= 1"),
    ("synth", "--audio-signal", "-1", ">= 0"),
    ("synth", "--seed", "-1", ">= 0"),
    ("manifest", "--kfold", "1", ">= 2"),
    ("manifest", "--kfold-seed", "-3", ">= 0"),
    ("sweep", "--jobs", "0", ">= 1"),
])
def test_cli_options_are_checked_against_their_range(tmp_path, command, option, value, allowed):
    args = {"preprocess": ["cremad", "--root", str(tmp_path), "--out", str(tmp_path / "out")],
            "synth": ["cremad", "--out", str(tmp_path / "out")],
            "manifest": ["cremad", "--root", str(tmp_path), "--out", str(tmp_path / "out")],
            "sweep": ["--config", str(tmp_path / "sweep.yaml")]}[command]
    proc = cli(command, *args, f"{option}={value}")
    message = one_line(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"argument {option}" in message and value in message and allowed in message, message
    assert not (tmp_path / "out").exists()
