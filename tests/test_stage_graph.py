"""The stages' order, cache keys, dependency checks and dispatch come from the registered
stage classes: the shipped order is frames, flow, faces, face_features, audio, pack whatever
the registration order; a stage registered by a test only (``tests/stage_toy.py``) runs on
the local engine and on Ray, is cached and packed like the others, and a stage whose input
stage is not selected is refused. The registry is as it was after every test."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import numpy as np
import pytest

from avbalance.errors import UserError
from pipelines.config import ALL_STAGES, PreprocessConfig
from pipelines.runner import preprocess
from pipelines.stages.base import STAGES, check_selection, clip_stages, stage_order, video_stages
from pipelines.stages.faces import FacesConfig
from tests.conftest import run_cli
from tests.stage_toy import FaceCountStage, LoudnessStage, loudness, registered

SHIPPED = ["frames", "flow", "faces", "face_features", "audio", "pack"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("graph") / "corpus")
    run_cli("synth", "cremad", "--out", out, "--actors", "2", "--sentences", "1", "--seed", "3", check=True)
    return out


@pytest.fixture(autouse=True)
def registry_unchanged():
    """Every test leaves the stage registry as it found it."""
    before = dict(STAGES._items)
    yield
    assert STAGES._items == before


def run(corpus: str, out: str, stages: tuple[str, ...], **options) -> dict:
    return preprocess(PreprocessConfig(root=corpus, out=out, splits=("ogm",), stages=stages, **options))


def samples(out: str) -> dict[str, dict[str, bytes]]:
    """Every sample of the ogm shard set: clip id -> member name -> bytes."""
    found: dict[str, dict[str, bytes]] = {}
    for path in sorted(glob.glob(os.path.join(out, "shards", "ogm", "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, name = member.name.split(".", 1)
                found.setdefault(key, {})[name] = tar.extractfile(member).read()
    return found


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def shard_bytes(out: str) -> dict[str, bytes]:
    paths = sorted(glob.glob(os.path.join(out, "shards", "*", "*"))) + [os.path.join(out, "status.jsonl")]
    return {os.path.relpath(p, out): open(p, "rb").read() for p in paths}


def test_the_shipped_order_comes_from_the_graph_whatever_the_registration_order(monkeypatch):
    assert stage_order() == SHIPPED
    assert list(ALL_STAGES) == SHIPPED and PreprocessConfig(root=".", out=".").stages == tuple(SHIPPED)
    assert clip_stages() == SHIPPED[:-1]
    assert video_stages() == ["frames", "flow", "faces", "face_features"]  # face_features through faces
    for shuffled in (dict(reversed(list(STAGES._items.items()))), dict(sorted(STAGES._items.items()))):
        monkeypatch.setattr(STAGES, "_items", shuffled)
        assert stage_order() == SHIPPED


def test_a_registered_stage_takes_its_place_in_the_order_and_the_checks():
    with registered(loudness=LoudnessStage, face_count=FaceCountStage):
        assert stage_order() == ["frames", "flow", "faces", "face_features", "audio", "face_count", "loudness", "pack"]
        assert "face_count" in video_stages() and "loudness" not in video_stages()
        with pytest.raises(UserError, match="^unknown stage\\(s\\) warp; choose from frames, flow, faces, "
                                            "face_features, audio, face_count, loudness, pack$"):
            check_selection(["frames", "warp"])
        with pytest.raises(UserError, match="^the loudness stage needs the audio stage: add audio to --stages$"):
            check_selection(["frames", "loudness", "pack"])
        check_selection(["audio", "loudness", "pack"])
    assert "loudness" not in STAGES and stage_order() == SHIPPED
    with pytest.raises(UserError, match="^unknown stage\\(s\\) loudness; choose from frames, flow, faces, face_features, audio, pack$"):
        check_selection(["loudness"])


def test_a_stage_without_its_input_stage_is_refused_before_anything_is_written(corpus, tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(UserError, match="^the face_features stage needs the faces stage: add faces to --stages$"):
        run(corpus, out, ("frames", "face_features", "pack"))
    with registered(loudness=LoudnessStage):
        with pytest.raises(UserError, match="^the loudness stage needs the audio stage: add audio to --stages$"):
            run(corpus, out, ("frames", "loudness", "pack"))
    assert not os.path.exists(out)


def check_loudness_run(out: str, summary: dict) -> None:
    """Every clip's loudness is cached and packed (``loudness_rms.npy``), equal to the value
    computed from the audio the same sample holds; the index records the stage's settings."""
    clips = summary["clips"]
    assert summary["done"] == clips and summary["failed"] == 0
    assert len(glob.glob(os.path.join(out, "cache", "loudness", "*.npz"))) == clips
    index = json.load(open(os.path.join(out, "shards", "ogm", "shards.json")))
    assert index["keys"] == ["cls", "json", "loudness_rms.npy", "spec.npy", "wav.npy"]
    assert index["config"]["loudness"] == {"window_s": 0.25}
    found = samples(out)
    assert len(found) == clips
    for sample in found.values():
        rms = npy(sample["loudness_rms.npy"])
        assert rms.dtype == np.float32 and len(rms) > 1
        np.testing.assert_array_equal(rms, loudness(npy(sample["wav.npy"]), 0.25))


def test_a_registered_stage_runs_on_the_local_engine_cached_and_packed(corpus, tmp_path):
    stages = ("audio", "loudness", "pack")
    with registered(loudness=LoudnessStage):
        one = str(tmp_path / "one")
        check_loudness_run(one, run(corpus, one, stages, workers=1))  # in this process
        two = str(tmp_path / "two")
        check_loudness_run(two, run(corpus, two, stages, workers=2))  # on forked workers
        assert shard_bytes(one) == shard_bytes(two)
        again = run(corpus, one, stages, workers=1)  # its outputs are cached under their keys
        assert again["computed_clips"] == 0
    without = str(tmp_path / "without")
    run(corpus, without, ("audio", "pack"))
    assert "loudness_rms.npy" not in next(iter(samples(without).values()))


def test_a_stage_reading_a_batched_stage_waits_for_it(corpus, tmp_path):
    """faces comes at the end of a chunk (its frames are batched across clips): a stage that
    reads it runs after it, in the same chunk."""
    out = str(tmp_path / "o")
    with registered(face_count=FaceCountStage):
        summary = run(corpus, out, ("faces", "face_count", "pack"), workers=1, backend="torch",
                      faces=FacesConfig(fps=1.0, size=224, detect_scale=0.5))
    assert summary["done"] == summary["clips"] and summary["failed"] == 0
    found = samples(out)
    assert len(found) == summary["clips"]
    for sample in found.values():
        assert int(npy(sample["face_count_found.npy"])) == int(npy(sample["face_mask.npy"]).sum()) > 0


@pytest.mark.xdist_group("ray")  # one Ray cluster at a time under pytest -n (as tests/test_engine_ray.py)
def test_a_registered_stage_runs_on_ray_as_on_the_local_engine(corpus, tmp_path, monkeypatch):
    """The toy stage is registered in this process only: the engine sends it to the Ray
    workers, which import its module and register it there. (One local Ray runtime: ~20 s
    on 2 cores, so not marked slow.)"""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    stages = ("audio", "loudness", "pack")
    with registered(loudness=LoudnessStage):
        local = str(tmp_path / "local")
        run(corpus, local, stages, workers=2)
        ray = str(tmp_path / "ray")
        summary = run(corpus, ray, stages, workers=2, engine="ray")
    check_loudness_run(ray, summary)
    assert shard_bytes(ray) == shard_bytes(local)
