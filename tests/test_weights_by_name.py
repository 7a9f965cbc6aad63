"""Pretrained weights by Hugging Face model id or by local path (avbalance/hub.py): the face
features' ``--face-weights`` and the Wav2Vec2 ``pretrained_dir``. Tests run offline: an id that
is not cached fails at once; one that is in the (temporary) cache is used from there."""

from __future__ import annotations

import time

import pytest
import torch

from avbalance.errors import UserError
from avbalance.hashing import sha256_file
from avbalance.hub import model_id, weight_sources
from pipelines.stages.face_features import FaceFeaturesConfig, FaceFeaturesStage, weights_identity
from trainer.encoders import ENCODERS
from tests.test_models import TINY_CONFORMER, TINY_W2V

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline; ``add(repo, name)`` gives a file's cached path."""
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def add(repo: str, name: str):
        root = cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(COMMIT)
        path = root / "snapshots" / COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    return add


def test_model_id_or_path(tmp_path) -> None:
    assert model_id("hf-hub:timm/efficientnet_b2.ra_in1k") == "timm/efficientnet_b2.ra_in1k"
    assert model_id("facebook/wav2vec2-large-robust") == "facebook/wav2vec2-large-robust"
    assert model_id("models/effnet_b2.safetensors") is None       # a weights file name: a path
    assert model_id("/abs/dir") is None and model_id("./rel/dir") is None and model_id("w.pth") is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    local = str(tmp_path / "org" / "name")
    assert model_id(local) is None
    with pytest.raises(UserError, match="not a Hugging Face model id"):
        model_id("hf-hub:not an id")


# -- face features -----------------------------------------------------------------------------
def test_face_weights_id_offline_fails_at_once(hf_cache) -> None:
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        weights_identity("hf-hub:timm/efficientnet_b2.ra_in1k", allow_random=False)
    assert time.monotonic() - start < 5  # no network retries
    text = str(err.value)
    assert "timm/efficientnet_b2.ra_in1k" in text and "HF_HUB_OFFLINE" in text
    assert "--face-weights models/efficientnet_b2/model.safetensors" in text  # how to pass a local file


def _b2_state(seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model("efficientnet_b2", num_classes=0).state_dict().items()}


def test_face_weights_id_from_the_cache_and_local_file(hf_cache, tmp_path) -> None:
    from safetensors.torch import save_file

    state = _b2_state(7)
    cached = hf_cache("timm/efficientnet_b2.tiny_test", "model.safetensors")
    save_file(state, str(cached))
    local = tmp_path / "local.safetensors"
    save_file(state, str(local))
    # the id's file in the cache and the same bytes as a local file: one identity
    by_id = weights_identity("hf-hub:timm/efficientnet_b2.tiny_test", allow_random=False)
    assert by_id == weights_identity(str(local), allow_random=False) == sha256_file(str(local))
    crops = torch.rand(2, 3, 224, 224) * 255
    a = FaceFeaturesStage(FaceFeaturesConfig(weights="hf-hub:timm/efficientnet_b2.tiny_test", weights_sha256=by_id))
    b = FaceFeaturesStage(FaceFeaturesConfig(weights=str(local), weights_sha256=by_id))
    torch.testing.assert_close(a.features(crops), b.features(crops))


# -- Wav2Vec2 ------------------------------------------------------------------------------------
def test_wav2vec2_id_offline_fails_at_once(hf_cache) -> None:
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        ENCODERS.get("wav2vec2_conformer")(pretrained_dir="facebook/wav2vec2-large-robust", **TINY_CONFORMER)
    assert time.monotonic() - start < 5
    text = str(err.value)
    assert "facebook/wav2vec2-large-robust" in text and "HF_HUB_OFFLINE" in text
    assert "pretrained_dir=models/wav2vec2-large-robust" in text


def test_wav2vec2_id_from_the_cache_and_local_dir_are_recorded(hf_cache, tmp_path) -> None:
    source = ENCODERS.get("wav2vec2_conformer")(**{**TINY_W2V, "num_layers": 2, "keep_layers": 2})
    source.w2v.save_pretrained(str(tmp_path / "local"))
    cached = hf_cache("someone/tiny-w2v2", "config.json")
    for name in ("config.json", "model.safetensors"):
        hf_cache("someone/tiny-w2v2", name).write_bytes((tmp_path / "local" / name).read_bytes())
    sha = sha256_file(str(tmp_path / "local" / "model.safetensors"))

    by_id = ENCODERS.get("wav2vec2_conformer")(pretrained_dir="someone/tiny-w2v2", keep_layers=1, **TINY_CONFORMER)
    by_dir = ENCODERS.get("wav2vec2_conformer")(pretrained_dir=str(tmp_path / "local"), keep_layers=1, **TINY_CONFORMER)
    assert by_id.weights_source == {"id": "someone/tiny-w2v2", "sha256": sha}
    assert by_dir.weights_source == {"path": str(tmp_path / "local"), "sha256": sha}
    assert cached.exists()
    torch.testing.assert_close(by_id.w2v.encoder.layers[0].attention.q_proj.weight,
                               source.w2v.encoder.layers[0].attention.q_proj.weight)
    random_init = ENCODERS.get("wav2vec2_conformer")(**TINY_W2V)
    assert random_init.weights_source is None

    class Model(torch.nn.Module):  # what the loop writes to RUN/weights.json
        def __init__(self) -> None:
            super().__init__()
            self.encoders = torch.nn.ModuleDict({"audio": by_id, "visual": random_init})

    assert weight_sources(Model()) == {"model.encoders.audio": {"id": "someone/tiny-w2v2", "sha256": sha}}
