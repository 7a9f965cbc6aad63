"""The ONNX Runtime backend of the face stages against the torch path, on the synthetic
corpus's photo face: boxes within 1 px, features within 1e-3; the export is cached.

Fast: the option on every corpus's ``preprocess`` and how ``auto`` resolves (no export).
Slow: everything that exports a network (~15 s each for EfficientNet-B2 on 2 cores) or runs
the face stages under both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from avbalance.errors import UserError
from pipelines.stages import onnx_backend
from pipelines.stages.face_features import FaceFeaturesConfig, FaceFeaturesStage, weights_identity
from pipelines.stages.faces import FaceBatcher, FacesConfig
from pipelines.stages.onnx_backend import exported, ort_module, resolve_backend, session
from pipelines.synth.face import actor_look, render_frames
from tests.conftest import REPO, run_cli
from tests.test_cli_usage import subcommands

SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def needs_onnx() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")


def test_backend_option_on_every_corpus_and_auto_resolution(monkeypatch):
    preprocess = {k: p for k, p in subcommands().items() if k.startswith("preprocess ")}
    assert len(preprocess) >= 3  # cremad, folder, ave, ...
    for command, parser in preprocess.items():
        options = {a.dest: a for a in parser._actions}
        assert options["backend"].default == "auto" and tuple(options["backend"].choices) == ("auto", "torch", "onnx"), command
        assert options["face_detect_scale"].default == 1.0, command
    cremad = preprocess["preprocess cremad"]
    args = cremad.parse_args(["--root", "r", "--out", "o", "--backend", "onnx", "--face-detect-scale", "0.5"])
    assert (args.backend, args.face_detect_scale) == ("onnx", 0.5)
    with pytest.raises(SystemExit):
        cremad.parse_args(["--root", "r", "--out", "o", "--face-detect-scale", "1.5"])

    installed = onnx_backend.onnx_available()
    assert resolve_backend("auto", "cpu") == ("onnx" if installed else "torch")
    assert resolve_backend("auto", "cuda") == "torch"  # onnxruntime's CPU package
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(UserError, match="CPU only"):
        resolve_backend("onnx", "cuda")
    with pytest.raises(UserError, match="not known"):
        resolve_backend("tensorrt", "cpu")
    monkeypatch.setattr(onnx_backend, "onnx_available", lambda: False)  # as without the package
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(UserError, match="needs onnxruntime"):
        resolve_backend("onnx", "cpu")


def photo_frames(n: int, seed: int) -> np.ndarray:
    """Frames of the real photo face (scikit-image's astronaut) as ``cli.py synth`` renders them."""
    return render_frames(actor_look(np.random.default_rng(seed)), "SAD", 0.6, n, 30, np.random.default_rng(seed + 1))


@pytest.fixture(scope="module")
def weights(tmp_path_factory, needs_onnx) -> tuple[str, str]:
    """EfficientNet-B2 weights with realistic activations (a random init gives features ~1e-5,
    which any backend matches): BatchNorm gains drawn in 0.5-1.5 and statistics taken on face
    crops. Returns (path, sha256)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = timm.create_model("efficientnet_b2", num_classes=0)
    x = torch.from_numpy(photo_frames(4, 9)).permute(0, 3, 1, 2).float()[:, :, 40:300, 110:370]
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats = the batch's
            m.reset_running_stats()
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    with torch.no_grad():
        model.train()((x / 255 - 0.45) / 0.225)
    path = str(tmp_path_factory.mktemp("w") / "b2.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, weights_identity(path, allow_random=False)


def run(backend: str, frames: np.ndarray, weights: tuple[str, str], cfg: FacesConfig):
    featurizer = FaceFeaturesStage(FaceFeaturesConfig(weights=weights[0], weights_sha256=weights[1]), backend=backend)
    batcher = FaceBatcher(cfg, featurizer, batch_size=8, backend=backend)
    batcher.start_clip("c")
    for i, rgb in enumerate(frames):
        batcher.push("c", i, i / 30, rgb)
    batcher.flush()
    faces, feats = batcher.finish_clip("c")
    # float32 features of face crops (noise crops would be out of distribution for these
    # weights, whose random layers then amplify any rounding difference chaotically)
    raw = featurizer.features32(torch.from_numpy(frames[:4]).permute(0, 3, 1, 2).float()[:, :, 40:264, 110:334])
    return faces, feats["feats"], raw


@SLOW  # ~70 s: two EfficientNet-B2 builds, one export, MTCNN under both backends
def test_onnx_matches_torch_on_real_frames(weights):
    frames = photo_frames(12, 3)
    frames[4] = 128  # a frame without a face keeps its slot with either backend
    got = {b: run(b, frames, weights, FacesConfig(size=224)) for b in ("torch", "onnx")}
    (faces_t, feats_t, raw_t), (faces_o, feats_o, raw_o) = got["torch"], got["onnx"]
    assert faces_t["mask"].tolist() == faces_o["mask"].tolist() == [1] * 4 + [0] + [1] * 7
    assert np.abs(faces_t["boxes"] - faces_o["boxes"]).max() <= 1.0  # px
    assert np.abs(faces_t["probs"] - faces_o["probs"]).max() <= 1e-3
    assert np.abs(feats_t).max() > 0.1  # features of a useful size, not a near-zero init
    assert np.abs(raw_t - raw_o).max() <= 1e-3  # float32, before storage
    # As stored (float16): 1e-3, or one float16 step where the value is large enough that
    # rounding a difference of 1e-6 can land on neighbouring values.
    stored = np.abs(feats_t.astype(np.float32) - feats_o.astype(np.float32))
    step = np.spacing(np.maximum(np.abs(feats_t), np.abs(feats_o)).astype(np.float16)).astype(np.float32)
    assert (stored <= np.maximum(1e-3, step)).all()


@SLOW
def test_export_is_cached_by_identity(tmp_path, monkeypatch, needs_onnx):
    monkeypatch.setenv("AVBALANCE_CACHE_DIR", str(tmp_path))
    calls = []

    def build() -> torch.nn.Module:
        calls.append(1)
        torch.manual_seed(len(calls))
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())

    x = torch.rand(2, 3, 16, 16)
    first = exported("tiny", "weights-a", build, x, {0: "n", 2: "h", 3: "w"}, ["y"])
    again = exported("tiny", "weights-a", build, x, {0: "n", 2: "h", 3: "w"}, ["y"])
    other = exported("tiny", "weights-b", build, x, {0: "n", 2: "h", 3: "w"}, ["y"])
    assert first == again != other and len(calls) == 2  # the second call found the file
    assert os.path.dirname(first) == os.path.join(str(tmp_path), "onnx")
    kept = [n for n in os.listdir(os.path.dirname(first)) if not n.endswith(".lock")]
    assert sorted(kept) == sorted(os.path.basename(p) for p in (first, other))  # no temp file
    sess = session(first, 1)
    out = ort_module(sess)(torch.rand(3, 3, 20, 24))[0]
    assert out.shape == (3, 4, 18, 22)  # dynamic batch, height and width
    opts = sess.get_session_options()  # idle threads do not spin (bench/preprocess.py --faces-only)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"


RACE = """
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
from pipelines.stages.onnx_backend import exported

def build():
    with open(os.path.join(sys.argv[2], "builds"), "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(2)  # the other process asks meanwhile
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())

print(exported("tiny", "weights-a", build, torch.rand(2, 3, 16, 16), {0: "n"}, ["y"]))
"""


@SLOW
def test_processes_needing_one_export_at_once_export_it_once(tmp_path, needs_onnx):
    """Preprocess workers (or runs) that start together: one exports, the others wait and reuse it."""
    env = {**os.environ, "AVBALANCE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, REPO, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1 and os.path.isfile(paths.pop())
    with open(tmp_path / "builds", encoding="utf-8") as fh:
        assert len(fh.read().split()) == 1  # built (and exported) by one of them only


@SLOW  # ~35 s: a corpus and two CLI runs with the face stages
def test_cli_backends_share_the_cache(synth_corpus, tmp_path, needs_onnx):
    """A run with the other backend finds the stages done: the backend is not in the key."""
    out = str(tmp_path / "out")
    args = ["preprocess", "cremad", "--root", synth_corpus, "--out", out, "--split", "ogm", "--stages", "faces",
            "--face-fps", "1", "--face-size", "224"]
    run_cli(*args, "--backend", "onnx", check=True)
    summary = os.path.join(out, "preprocess.json")
    first = json.load(open(summary))
    assert first["face_backend"] == "onnx" and first["computed_clips"] == first["clips"]
    run_cli(*args, "--backend", "torch", check=True)
    assert json.load(open(summary))["computed_clips"] == 0
    bad = run_cli(*args, "--backend", "tensorrt")
    assert bad.returncode != 0 and "--backend" in bad.stderr


def test_detect_scale_at_its_default_is_recorded_as_earlier_versions_did():
    """Cache keys and shards.json leave the option out at its default (1.0), so shard sets and
    face caches written before it existed stay valid and byte-identical; any other value is
    recorded and changes the key."""
    from pipelines.config import PreprocessConfig
    from pipelines.runner import _public_config
    from pipelines.stages.faces import FacesStage

    plain = PreprocessConfig(root="r", out="o")
    scaled = PreprocessConfig(root="r", out="o", faces=FacesConfig(detect_scale=0.5))
    assert "detect_scale" not in _public_config(plain)["faces"]
    assert _public_config(scaled)["faces"]["detect_scale"] == 0.5
    keys = {"video": "v"}
    assert FacesStage(plain.faces).key(keys) != FacesStage(scaled.faces).key(keys)
    assert FacesStage(plain.faces).key(keys) == FacesStage(FacesConfig()).key(keys)
