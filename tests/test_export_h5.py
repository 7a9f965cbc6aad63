"""`cli.py export h5`: a small hand-made shard set round-trips through the HDF5 file."""

from __future__ import annotations

import io
import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from pipelines.export_h5 import JPEG_KEYS, NPY_KEYS, read_h5_sample
from pipelines.shards import ShardWriter, write_index
from pipelines.stages.pack import npy_bytes
from tests.conftest import run_cli

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_sample(i: int) -> dict[str, bytes | str]:
    """A sample with the shard keys and dtypes of `preprocess`, T and N varying per clip."""
    rng = np.random.default_rng(i)
    actor, emotion = 1001 + i % 3, EMOTIONS[i % 6]
    clip_id = f"{actor}_DFA_{emotion}_XX" if i < 6 else f"{actor}_IEO_{emotion}_HI"
    t, n, frames = 3 + i % 4, 16000 + 531 * i, 2 + i % 2
    meta = {"clip_id": clip_id, "actor": actor, "sentence": clip_id.split("_")[1], "emotion": emotion,
            "label": i % 6, "level": clip_id.split("_")[3], "demographics": {"sex": "Female"}, "votes": {"ANG": 0.5},
            "frames": {"count": frames, "stride": 32}, "faces": {"count": t, "found": t - 1, "stride": 16},
            "video": {"width": 30, "height": 24}}
    return {
        "__key__": clip_id,
        "frames.jpg": jpeg(32 * frames, 24, i),
        "faces.jpg": jpeg(16 * t, 16, 100 + i),
        "face_feats.npy": npy_bytes(rng.standard_normal((t, 1408)).astype(np.float16)),
        "face_mask.npy": npy_bytes((np.arange(t) > 0).astype(np.uint8)),
        "face_boxes.npy": npy_bytes(rng.uniform(0, 30, (t, 4)).astype(np.float32)),
        "face_times.npy": npy_bytes((np.arange(t) / 30).astype(np.float32)),
        "wav.npy": npy_bytes(rng.integers(-3000, 3000, n, dtype=np.int16)),
        "spec.npy": npy_bytes(rng.standard_normal((128, 188)).astype(np.float16)),
        "cls": str(i % 6).encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


@pytest.fixture()
def shard_set(tmp_path) -> tuple[str, dict[str, list[dict]]]:
    """train: 5 samples in 3 shards of 2; test: 3 samples in 1 shard."""
    directory = str(tmp_path / "shards")
    os.makedirs(directory)
    samples = {"train": [make_sample(i) for i in range(5)], "test": [make_sample(i) for i in range(5, 8)]}
    parts, keys = {}, None
    for part, items in samples.items():
        writer = ShardWriter(directory, part, 2 if part == "train" else 8)
        for sample in items:
            writer.write(sample)
        parts[part] = {"samples": len(items), "shards": writer.close()}
        keys = writer.keys
    write_index(directory, {"schema_version": 1, "tool": "test", "corpus": "cremad", "split": "ogm", "keys": keys,
                            "parts": parts, "config": {}, "face_weights": None, "pack_key": "x"})
    return directory, samples


def test_export_round_trip(shard_set, tmp_path):
    directory, samples = shard_set
    out = str(tmp_path / "out" / "ogm.h5")
    proc = run_cli("export", "h5", "--shards", directory, "--out", out, check=True)
    assert "train 5" in proc.stdout and "test 3" in proc.stdout and out in proc.stdout
    assert not os.path.exists(out + ".tmp")

    with open(os.path.join(directory, "shards.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    assert len(index["parts"]["train"]["shards"]) == 3
    with h5py.File(out, "r") as f:
        assert f.attrs["split"] == "ogm" and json.loads(f.attrs["source_index"]) == index
        assert json.loads(f.attrs["face_weights"]) is None
        for part, items in samples.items():
            assert f[part].attrs["samples"] == index["parts"][part]["samples"] == len(items)
            assert f[part]["face_offsets"].shape == f[part]["wav_offsets"].shape == (len(items) + 1,)

    for part, items in samples.items():
        for i, sample in enumerate(items):
            got = read_h5_sample(out, part, i)
            assert got["clip_id"] == sample["__key__"]
            for key, name in NPY_KEYS.items():
                want = np.load(io.BytesIO(sample[key]), allow_pickle=False)
                assert got[name].dtype == want.dtype and np.array_equal(got[name], want), (part, i, name)
            for key, name in JPEG_KEYS.items():
                if key not in sample:  # e.g. flow_x.jpg: CREMA-D shards have no flow
                    assert name not in got, (part, i, name)
                    continue
                assert got[name] == sample[key]
            assert got["label"] == int(sample["cls"])
            assert got["meta_json"] == sample["json"].decode()
            meta = json.loads(sample["json"])
            assert (got["actor"], got["emotion"], got["sentence"], got["level"]) == (
                meta["actor"], meta["emotion"], meta["sentence"], meta["level"])


def test_export_one_part(shard_set, tmp_path):
    directory, _ = shard_set
    out = str(tmp_path / "test.h5")
    run_cli("export", "h5", "--shards", directory, "--out", out, "--parts", "test", check=True)
    with h5py.File(out, "r") as f:
        assert list(f) == ["test"] and f["test"]["label"].shape == (3,)


def test_missing_index_is_a_clear_error(shard_set, tmp_path):
    directory, _ = shard_set
    os.remove(os.path.join(directory, "shards.json"))
    out = str(tmp_path / "ogm.h5")
    proc = run_cli("export", "h5", "--shards", directory, "--out", out)
    assert proc.returncode != 0 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert "incomplete" in proc.stderr and "preprocess" in proc.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_damaged_shard_leaves_no_file(shard_set, tmp_path):
    """The last train shard fails its sha256 check after two shards were written: no output, no .tmp."""
    directory, _ = shard_set
    with open(os.path.join(directory, "train-000002.tar"), "r+b") as fh:
        fh.seek(600)
        fh.write(b"\x00damaged")
    out = str(tmp_path / "ogm.h5")
    proc = run_cli("export", "h5", "--shards", directory, "--out", out)
    assert proc.returncode != 0 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_a_re_export_of_the_same_shards_writes_nothing(shard_set, tmp_path):
    shard_set, _ = shard_set
    out = str(tmp_path / "set.h5")
    first = run_cli("export", "h5", "--shards", shard_set, "--out", out, check=True)
    assert "; written)" in first.stdout
    stamp = os.stat(out).st_mtime_ns
    again = run_cli("export", "h5", "--shards", shard_set, "--out", out, check=True)
    assert "up to date, nothing written" in again.stdout and os.stat(out).st_mtime_ns == stamp
    assert again.stdout.split("->")[0] == first.stdout.split("->")[0]  # the same counts
    one = run_cli("export", "h5", "--shards", shard_set, "--out", out, "--parts", "test", check=True)
    assert "; written)" in one.stdout  # another selection of parts is another export
