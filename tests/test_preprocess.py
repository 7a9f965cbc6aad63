"""`cli.py preprocess cremad` end to end on a small synthetic corpus: shards that stock
readers open, an index that matches the files, resumable and idempotent runs."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from manifests.io import read_jsonl
from tests.conftest import REPO, run_cli

FAST = ["--face-fps", "2", "--face-size", "224", "--allow-random-weights", "--split", "ogm"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("pre") / "corpus")
    run_cli("synth", "cremad", "--out", out, "--actors", "2", "--sentences", "1", "--seed", "3", check=True)
    return out


@pytest.fixture(scope="module")
def preprocessed(small_corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("pre") / "out")
    run_cli("preprocess", "cremad", "--root", small_corpus, "--out", out, "--workers", "2", *FAST, check=True)
    return out


def shard_digests(out: str) -> dict[str, tuple[str, int]]:
    return {
        os.path.relpath(p, out): (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
        for p in sorted(glob.glob(os.path.join(out, "shards", "*", "*")))
    }


def test_index_matches_the_shards(preprocessed):
    index = json.load(open(os.path.join(preprocessed, "shards", "ogm", "shards.json")))
    clips = read_jsonl(os.path.join(preprocessed, "manifest", "clips.jsonl"))
    expected = {p: sum(c["splits"]["ogm"] == p for c in clips) for p in ("train", "test")}
    assert {p: v["samples"] for p, v in index["parts"].items()} == {p: n for p, n in expected.items() if n}
    for part in index["parts"].values():
        assert sum(s["samples"] for s in part["shards"]) == part["samples"]
        for shard in part["shards"]:
            path = os.path.join(preprocessed, "shards", "ogm", shard["name"])
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]
            assert os.path.getsize(path) == shard["bytes"]
    assert index["schema_version"] == 2 and index["tool"].startswith("avbalance")
    assert index["face_weights"]["random_init"] is True
    assert index["config"]["faces"]["fps"] == 2.0 and index["config"]["audio"]["spec"] == "logmel"
    assert index["keys"] == sorted(["cls", "json", "frames.jpg", "face_feats.npy", "face_mask.npy",
                                    "face_boxes.npy", "face_times.npy", "wav.npy", "spec.npy"])
    status = read_jsonl(os.path.join(preprocessed, "status.jsonl"))
    assert len(status) == 12 and all(s["status"] == "done" for s in status)


def test_stock_webdataset_reads_the_shards(preprocessed):
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(preprocessed, "shards", "ogm", "train-*.tar")))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    index = json.load(open(os.path.join(preprocessed, "shards", "ogm", "shards.json")))
    assert len(samples) == index["parts"]["train"]["samples"]
    for s in samples:
        meta = s["json"]
        assert s["cls"] == meta["label"] and meta["clip_id"] == s["__key__"]
        frames = s["frames.jpg"]
        n = meta["frames"]["count"]
        assert frames.shape == (360, n * meta["frames"]["stride"], 3)
        assert n == int(np.ceil(meta["video"]["seconds"] - 1e-3))  # one frame per started second
        t = meta["faces"]["count"]
        assert s["face_feats.npy"].shape == (t, 1408) and s["face_feats.npy"].dtype == np.float16
        assert s["face_mask.npy"].shape == (t,) and s["face_mask.npy"].all()
        assert s["face_boxes.npy"].shape == (t, 4)
        assert abs(t - 2 * meta["video"]["seconds"]) <= 1  # --face-fps 2
        assert s["wav.npy"].dtype == np.int16 and abs(len(s["wav.npy"]) / 16000 - meta["audio"]["seconds"]) < 1e-3
        assert s["spec.npy"].shape == (128, 188) and s["spec.npy"].dtype == np.float16
        assert meta["demographics"]["sex"] in ("Male", "Female") and "voice" in meta["votes"]


def test_plain_tar_lists_members_without_dots_in_basenames(preprocessed):
    shard = sorted(glob.glob(os.path.join(preprocessed, "shards", "ogm", "*.tar")))[0]
    names = subprocess.run(["tar", "-tf", shard], capture_output=True, text=True, check=True).stdout.split()
    keys = {}
    for name in names:
        base, ext = name.split(".", 1)
        keys.setdefault(base, set()).add(ext)
        assert "." not in ext.rsplit(".", 1)[0] or ext.count(".") == 1
    assert len({frozenset(v) for v in keys.values()}) == 1  # the same key set in every sample
    assert not any(n.endswith((".pyd", ".pickle", ".pkl")) for n in names)


def test_hugging_face_datasets_reads_the_shards(preprocessed, tmp_path):
    from datasets import load_dataset

    files = sorted(glob.glob(os.path.join(preprocessed, "shards", "ogm", "train-*.tar")))
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
    index = json.load(open(os.path.join(preprocessed, "shards", "ogm", "shards.json")))
    assert len(ds) == index["parts"]["train"]["samples"]
    row = ds[0]
    assert np.asarray(row["spec.npy"]).shape == (128, 188)
    assert row["json"]["clip_id"] == row["__key__"]
    assert row["frames.jpg"].size[1] == 360


def test_rerun_with_the_same_config_does_no_work(small_corpus, preprocessed):
    before = shard_digests(preprocessed)
    proc = run_cli("preprocess", "cremad", "--root", small_corpus, "--out", preprocessed, *FAST, check=True)
    assert "0 computed this run" in proc.stdout
    assert shard_digests(preprocessed) == before  # same bytes, not even rewritten


def cache_state(out: str, stage: str) -> dict[str, int]:
    return {os.path.basename(p): os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "cache", stage, "*"))}


def test_changed_audio_config_redoes_only_audio(small_corpus, preprocessed, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(preprocessed, out)
    untouched = {s: cache_state(out, s) for s in ("frames", "faces", "face_features")}
    proc = run_cli("preprocess", "cremad", "--root", small_corpus, "--out", out, *FAST[:-2], "--split", "ogm",
                   "--spec", "linear", check=True)
    assert "12 computed this run" in proc.stdout
    for stage, files in untouched.items():
        assert cache_state(out, stage) == files, f"{stage} was redone"
    assert len(cache_state(out, "audio")) == 24  # old and new configs side by side
    import webdataset as wds

    sample = next(iter(wds.WebDataset(glob.glob(os.path.join(out, "shards", "ogm", "train-*.tar")), shardshuffle=False).decode()))
    assert sample["spec.npy"].shape == (257, 188)
    index = json.load(open(os.path.join(out, "shards", "ogm", "shards.json")))
    assert index["config"]["audio"]["spec"] == "linear"


def test_killed_run_resumes_and_matches_an_uninterrupted_one(small_corpus, preprocessed, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(REPO, "cli.py"), "preprocess", "cremad", "--root", small_corpus, "--out", out, *FAST]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(cache_state(out, "face_features")) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, workers included
    proc.wait()
    assert not os.path.exists(os.path.join(out, "shards", "ogm", "shards.json"))
    # Only complete cache entries carry their final names; a killed write leaves at most a .tmp.
    for path in glob.glob(os.path.join(out, "cache", "*", "*.npz")):
        np.load(path, allow_pickle=False).files

    done_before = len(cache_state(out, "face_features"))
    result = run_cli(*cmd[2:], check=True)
    computed = int(result.stdout.split(" computed this run")[0].rsplit("(", 1)[1])
    assert computed <= 12 - done_before + 2  # only what was left (a chunk in flight may be redone)

    import webdataset as wds

    def load(root):
        urls = sorted(glob.glob(os.path.join(root, "shards", "ogm", "*.tar")))
        return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}

    resumed, reference = load(out), load(preprocessed)
    assert resumed.keys() == reference.keys()
    for key, s in resumed.items():
        r = reference[key]
        assert np.array_equal(s["wav.npy"], r["wav.npy"]) and np.array_equal(s["spec.npy"], r["spec.npy"])
        assert np.array_equal(s["face_mask.npy"], r["face_mask.npy"])
        np.testing.assert_allclose(s["face_boxes.npy"], r["face_boxes.npy"], atol=0.05)
        np.testing.assert_allclose(s["face_feats.npy"].astype(np.float32), r["face_feats.npy"].astype(np.float32), atol=2e-2)
        assert np.array_equal(s["frames.jpg"], r["frames.jpg"])


def test_missing_weights_are_refused_clearly(small_corpus, tmp_path):
    proc = run_cli("preprocess", "cremad", "--root", small_corpus, "--out", str(tmp_path / "o"), "--split", "ogm")
    assert proc.returncode == 2 and "--face-weights" in proc.stderr and "Traceback" not in proc.stderr


def test_face_weights_model_id_offline_is_refused_at_once(small_corpus, tmp_path):
    start = time.time()
    proc = run_cli("preprocess", "cremad", "--root", small_corpus, "--out", str(tmp_path / "o"), "--split", "ogm",
                   "--face-weights", "hf-hub:avbalance-tests/not-a-cached-model")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "avbalance-tests/not-a-cached-model" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert time.time() - start < 30  # a network retry would take ~45 s


def test_unknown_split_and_stage_are_refused(small_corpus, tmp_path):
    proc = run_cli("preprocess", "cremad", "--root", small_corpus, "--out", str(tmp_path / "o"), *FAST[:-2], "--split", "vavl9")
    assert proc.returncode == 2 and "vavl9" in proc.stderr
    proc = run_cli("preprocess", "cremad", "--root", small_corpus, "--out", str(tmp_path / "o"), *FAST, "--stages", "frames,warp")
    assert proc.returncode == 2 and "warp" in proc.stderr


def test_stage_subset_packs_only_those_keys(small_corpus, tmp_path):
    out = str(tmp_path / "o")
    run_cli("preprocess", "cremad", "--root", small_corpus, "--out", out, "--split", "ogm", "--stages", "frames,audio,pack", check=True)
    index = json.load(open(os.path.join(out, "shards", "ogm", "shards.json")))
    assert index["keys"] == ["cls", "frames.jpg", "json", "spec.npy", "wav.npy"]
    assert index["face_weights"] is None
    for stage in ("faces", "face_features", "flow"):  # no settings (no "random-init" weights) for a stage not run
        assert index["config"][stage] == "not run (stages: frames,audio,pack)"
    assert isinstance(index["config"]["audio"], dict)
    assert not os.path.exists(os.path.join(out, "cache", "faces"))


def test_disk_full_while_packing_publishes_nothing(small_corpus, preprocessed, tmp_path, monkeypatch):
    """An OSError mid-shard (ENOSPC) leaves no index and no half-written shard."""
    import errno

    from avbalance.errors import UserError
    from pipelines import shards
    from pipelines.config import PreprocessConfig
    from pipelines.runner import preprocess
    from pipelines.stages.face_features import FaceFeaturesConfig
    from pipelines.stages.faces import FacesConfig

    out = str(tmp_path / "out")
    shutil.copytree(preprocessed, out)
    shutil.rmtree(os.path.join(out, "shards"))
    real_write = shards.ShardWriter.write
    calls = {"n": 0}

    def failing_write(self, sample):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, sample)

    monkeypatch.setattr(shards.ShardWriter, "write", failing_write)
    cfg = PreprocessConfig(root=small_corpus, out=out, splits=("ogm",), faces=FacesConfig(fps=2.0, size=224),
                           face_features=FaceFeaturesConfig(allow_random=True))
    with pytest.raises(UserError, match="No space left"):
        preprocess(cfg)
    directory = os.path.join(out, "shards", "ogm")
    assert not os.path.exists(os.path.join(directory, "shards.json"))
    assert not glob.glob(os.path.join(directory, "*.tmp*"))
