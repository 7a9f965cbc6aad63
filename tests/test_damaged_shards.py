"""Damaged shard sets get a clear answer naming the shard and the sample, never a traceback:
a shard cut short (``truncate -s 5000``), a corrupt JPEG inside an intact shard (raised from
a loader worker), ``data.on_corrupt=skip`` counting what it skips, and ``verify-shards``."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest

from tests.conftest import run_cli

TINY = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
        "data.batch_size=8", "data.workers=1", "data.samples_per_epoch=16", "train.epochs=1", "train.patience=0"]


def squash(text: str) -> str:
    """Text without whitespace: error messages are wrapped to the terminal, paths included."""
    return "".join(text.split())


def copy_set(train_shards: str, tmp_path) -> str:
    out = str(tmp_path / "shards")
    shutil.copytree(train_shards, out)
    return out


def first_test_shard(shards: str) -> str:
    index = json.load(open(os.path.join(shards, "shards.json")))
    return os.path.join(shards, index["parts"]["test"]["shards"][0]["name"])


def corrupt_jpeg(path: str) -> str:
    """Zero the first frames.jpg in ``path`` in place (the size stays); return its sample key."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".frames.jpg"))
    with open(path, "r+b") as fh:
        fh.seek(member.offset_data)
        fh.write(b"\0" * member.size)
    return member.name.split(".")[0]


def train(shards: str, out: str, *extra: str):
    sets = [a for s in (*TINY, *extra) for a in ("--set", s)]
    return run_cli("train", "--config", "trainer/configs/resnet_joint.yaml", "--shards", shards, "--out", out, *sets)


def test_shard_cut_short_is_named_at_train_start(train_shards, tmp_path):
    shards = copy_set(train_shards, tmp_path)
    cut = first_test_shard(shards)
    os.truncate(cut, 5000)
    proc = train(shards, str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert squash(cut) in squash(proc.stderr) and "5000 bytes" in proc.stderr.replace("\n  ", " ")
    assert "verify-shards" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "last.pt")  # refused before any training

    check = run_cli("verify-shards", shards)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    bad = [ln for ln in check.stdout.splitlines() if os.path.basename(cut) in ln]
    assert bad and bad[0].startswith("size") and "5000 bytes" in bad[0]


def test_shard_cut_short_while_read_names_shard_and_sample(train_shards, tmp_path):
    """The reader itself (size check passed: the index was rewritten to the cut size) names
    the shard and the sample where it stopped; skip counts the samples lost."""
    from trainer.corrupt import CorruptLog
    from trainer.data_config import DataConfig
    from trainer.loader import make_loader
    from avbalance.errors import UserError

    shards = copy_set(train_shards, tmp_path)
    cut = first_test_shard(shards)
    os.truncate(cut, 5000)
    index_path = os.path.join(shards, "shards.json")
    index = json.load(open(index_path))
    entry = index["parts"]["test"]["shards"][0]
    entry["bytes"] = 5000
    json.dump(index, open(index_path, "w"))
    with tarfile.open(os.path.join(train_shards, entry["name"])) as tar:
        first_key = tar.getmembers()[0].name.split(".")[0]

    cfg = DataConfig(batch_size=8, workers=1, image_size=32, frames=1)
    loader, _ = make_loader(shards, "test", cfg, train=False)
    with pytest.raises(UserError) as err:
        list(loader)
    assert cut in str(err.value) and first_key in str(err.value) and "cut short" in str(err.value)

    skipped = CorruptLog()
    skip = DataConfig(batch_size=8, workers=1, image_size=32, frames=1, on_corrupt="skip")
    loader, _ = make_loader(shards, "test", skip, train=False, corrupt_log=skipped)
    read = sum(len(b["clip_id"]) for b in loader)
    assert skipped.count == entry["samples"]  # every sample of the cut shard (5000 bytes hold no whole sample)
    assert read == index["parts"]["test"]["samples"] - entry["samples"]


def test_corrupt_jpeg_from_a_loader_worker_is_named(train_shards, tmp_path):
    shards = copy_set(train_shards, tmp_path)
    shard = first_test_shard(shards)
    key = corrupt_jpeg(shard)
    proc = train(shards, str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = squash(proc.stderr)
    assert squash(shard) in message and key in message and "doesnotdecode" in message and "notadecodableJPEG" in message

    assert run_cli("verify-shards", shards).returncode == 0  # the size is intact
    check = run_cli("verify-shards", shards, "--hash")
    assert check.returncode == 1
    assert any(ln.startswith("sha256") and os.path.basename(shard) in ln for ln in check.stdout.splitlines())


def test_skip_counts_the_corrupt_sample_in_the_metrics(train_shards, tmp_path):
    shards = copy_set(train_shards, tmp_path)
    shard = first_test_shard(shards)
    key = corrupt_jpeg(shard)
    run = tmp_path / "run"
    proc = train(shards, str(run), "data.on_corrupt=skip")
    assert proc.returncode == 0, proc.stderr
    assert f"skipped 1 sample(s) at {key} in {shard}" in proc.stderr
    result = json.load(open(run / "eval_test.json"))
    assert result["skipped_corrupt"] == 1
    index = json.load(open(os.path.join(shards, "shards.json")))
    assert result["samples"] == index["parts"]["test"]["samples"] - 1
    test_line = [json.loads(ln) for ln in open(run / "metrics.jsonl") if '"kind": "test"' in ln][-1]
    assert test_line["skipped_corrupt"] == 1
    # evaluated after the fact: the same count, in its own eval file
    os.remove(run / "eval_test.json")
    assert run_cli("evaluate", "--run", str(run), "--split", "test").returncode == 0
    again = json.load(open(run / "eval_test.json"))
    assert again["skipped_corrupt"] == 1 and again["samples"] == result["samples"]


def test_verify_shards_passes_an_intact_set_and_refuses_a_non_set(train_shards, tmp_path):
    ok = run_cli("verify-shards", train_shards, "--hash")
    index = json.load(open(os.path.join(train_shards, "shards.json")))
    n = sum(len(v["shards"]) for v in index["parts"].values())
    assert ok.returncode == 0 and f"{n} of {n} shard(s) ok, 0 damaged" in ok.stdout
    root = os.path.dirname(os.path.dirname(train_shards))  # the preprocess output folder
    wrong = run_cli("verify-shards", root)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr and squash(train_shards) in squash(wrong.stderr)


@pytest.mark.parametrize("setting, words", [
    ("data.on_corrupt=ignore", "data.on_corrupt"),
    ("data.exclude_quality=[silent,loud]", "unknown quality flag"),
])
def test_bad_data_settings_are_refused(train_shards, tmp_path, setting, words):
    proc = train(train_shards, str(tmp_path / "run"), setting)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
