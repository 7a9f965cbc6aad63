"""face_features: frozen timm EfficientNet-B2, global-pooled 1408-d per face crop, float16.

Weights (``--face-weights``) come from a local file (a timm state dict as ``.pth``/``.pt`` or
``.safetensors``) or from a Hugging Face model id such as ``hf-hub:timm/efficientnet_b2.ra_in1k``,
whose ``model.safetensors`` (or ``pytorch_model.bin``) is downloaded once into the Hugging Face
cache (``avbalance/hub.py``; offline, a model that is not cached fails at once). The shard
index records what was given (path or id) and the weights file's sha256. Without weights the
stage refuses, unless ``--allow-random-weights`` (tests, demos) asks for a seeded random init,
which is then recorded in the shard index as the weights' identity.

Backends (``--backend``): ``torch`` runs the timm model; ``onnx`` runs the same weights
exported to ONNX (normalisation included) under ONNX Runtime, exported once and cached by
the weights' sha256 (``pipelines/stages/onnx_backend.py``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from avbalance import shard_format as F
from avbalance.errors import UserError
from avbalance.hashing import sha256_file
from avbalance.hub import fetch_file, model_id
from pipelines.stages.base import STAGES, Stage, npy_bytes, stable_hash

if TYPE_CHECKING:  # torch is imported where it is used: the CLI starts fast without it
    import torch

    from pipelines.config import PreprocessConfig
    from pipelines.worker import ClipWork

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0


def onnx_step(threads: int) -> int:
    """Crops per ONNX Runtime call on CPU: on one intra-op thread one crop at a time is fastest,
    more threads want a few crops to share (bench/preprocess.py --faces-only, ``backends``)."""
    return 1 if threads == 1 else 4


@dataclass(frozen=True)
class FaceFeaturesConfig:
    model: str = "efficientnet_b2"
    weights: str | None = None  # path or Hugging Face model id, or None with allow_random
    weights_sha256: str = "random-init"  # identity used in cache keys and the index
    allow_random: bool = False


LOCAL_HINT = ("download the weights file once, e.g. `hf download timm/efficientnet_b2.ra_in1k "
              "model.safetensors --local-dir models/efficientnet_b2`, and pass "
              "--face-weights models/efficientnet_b2/model.safetensors (any timm EfficientNet-B2 state dict, "
              ".pth or .safetensors)")


def resolve_weights(spec: str) -> str:
    """The local weights file for ``--face-weights``: the path itself, or a model id's file in
    the Hugging Face cache (downloaded on first use)."""
    repo = model_id(spec)
    if repo is None:
        return spec
    return fetch_file(repo, ("model.safetensors", "pytorch_model.bin"), "--face-weights", LOCAL_HINT)


def weights_identity(path: str | None, allow_random: bool) -> str:
    """sha256 of the weights file (a model id's is fetched first), or ``random-init-seed0``;
    refuses a missing file clearly."""
    if path is None:
        if not allow_random:
            raise UserError(
                "face features need EfficientNet-B2 weights: pass --face-weights PATH (a timm state dict, "
                ".pth or .safetensors) or a model id such as hf-hub:timm/efficientnet_b2.ra_in1k. For tests "
                "and demos only, --allow-random-weights uses a seeded random init, recorded in the shard index."
            )
        return f"random-init-seed{RANDOM_SEED}"
    local = resolve_weights(path)
    if not os.path.isfile(local):
        raise UserError(f"--face-weights {path} does not exist (a local file, or a model id such as "
                        "hf-hub:timm/efficientnet_b2.ra_in1k)")
    return sha256_file(local)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # not a tensor-only checkpoint
            raise UserError(f"cannot read --face-weights {path} as a weights-only state dict: {err}") from None
    for nest in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and nest in state and isinstance(state[nest], dict):
            state = state[nest]
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_backbone(cfg: FaceFeaturesConfig, device: str) -> torch.nn.Module:
    """The frozen feature extractor in eval mode, channels_last, on ``device``."""
    import timm
    import torch

    torch.manual_seed(RANDOM_SEED)  # a random init is reproducible and named in the index
    model = timm.create_model(cfg.model, pretrained=False, num_classes=0)
    if cfg.weights:
        local = resolve_weights(cfg.weights)
        state = {k: v for k, v in _read_state_dict(local).items() if not k.startswith("classifier.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)[:200]
            raise UserError(f"--face-weights {cfg.weights} does not fit timm {cfg.model}: {first.strip()}") from None
        if missing or unexpected:
            raise UserError(
                f"--face-weights {cfg.weights} does not fit timm {cfg.model}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    model.eval().requires_grad_(False)
    return model.to(device=device, memory_format=torch.channels_last)


def with_normalisation(backbone: torch.nn.Module) -> torch.nn.Module:
    """The exported graph: ImageNet normalisation of 0..255 crops, then the backbone."""
    import torch

    class Normalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone((x - self.mean) / self.std)

    return Normalised()


def export_onnx(cfg: FaceFeaturesConfig) -> str:
    """The cached ONNX file of this backbone (exported from the same weights on first use)."""
    import timm
    import torch

    from pipelines.stages.onnx_backend import exported

    # timm's version is part of a random init's identity (its init code draws the numbers).
    identity = f"{cfg.model}:{cfg.weights_sha256}:timm-{timm.__version__}"
    return exported(cfg.model, identity, lambda: with_normalisation(build_backbone(cfg, "cpu")),
                    torch.zeros(2, 3, 260, 260), {0: "n", 2: "h", 3: "w"}, ["feats"])


def face_features_key(cfg: FaceFeaturesConfig, input_keys: dict[str, str]) -> str:
    """The weights' content, not their path, identifies the output (no model is built)."""
    return stable_hash("face_features", FaceFeaturesStage.version, cfg.model, cfg.weights_sha256, input_keys["faces"])


@STAGES.register("face_features")
class FaceFeaturesStage(Stage):
    """Computed by the faces stage's batcher from its crops (``pipelines/stages/faces.py``);
    an instance is the feature extractor."""

    version = 1
    inputs = ("faces",)
    Config = FaceFeaturesConfig
    rank = 40
    heavy = True

    @classmethod
    def cache_key(cls, config: FaceFeaturesConfig, input_keys: dict[str, str]) -> str:
        return face_features_key(config, input_keys)

    @classmethod
    def resolve(cls, cfg: PreprocessConfig) -> None:
        """The weights' identity (their sha256, fetched first when named by model id), or a refusal."""
        config = cfg.face_features
        cfg.face_features = dataclasses.replace(
            config, weights_sha256=weights_identity(config.weights, config.allow_random))

    @classmethod
    def export_models(cls, cfg: PreprocessConfig) -> None:
        if cfg.backend == "onnx":
            export_onnx(cfg.face_features)

    @classmethod
    def begin(cls, work: ClipWork) -> None:
        from pipelines.stages.faces import start_face_clip

        start_face_clip(work)

    @classmethod
    def compute(cls, work: ClipWork) -> None:
        return None  # from the faces batcher, at the chunk's end

    @classmethod
    def finish(cls, work: ClipWork) -> dict[str, np.ndarray]:
        from pipelines.stages.faces import finish_face_clip

        return finish_face_clip(work)[1]

    @classmethod
    def abandon(cls, work: ClipWork) -> None:
        from pipelines.stages.faces import drop_face_clip

        drop_face_clip(work)

    @classmethod
    def placeholder(cls, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
        """Zero features for one face slot."""
        return {"feats": np.zeros((1, 1408), np.float16)}

    @classmethod
    def pack(cls, out: dict[str, np.ndarray], clip: dict, pack_config) -> tuple[dict[str, bytes], dict]:
        return {F.FACE_FEATS: npy_bytes(out["feats"].astype(np.float16))}, {}

    def __init__(self, config: FaceFeaturesConfig, device: str = "cpu", backend: str = "torch", threads: int | None = None) -> None:
        import torch

        super().__init__(config)
        self.device = device
        self.backend = backend
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        if backend == "onnx":
            from pipelines.stages.onnx_backend import session

            self.threads = threads or torch.get_num_threads()
            self.session = session(export_onnx(config), self.threads)
        else:
            self.model = build_backbone(config, device)

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float crops in 0..255 -> (N, 1408) float16 features (what is stored)."""
        import torch

        return self.features32(crops).to(torch.float16)

    def features32(self, crops: torch.Tensor) -> torch.Tensor:
        """The features in float32, on the CPU, before storage rounds them.

        With torch on CPU the network runs 8 crops at a time: larger batches fall out of cache
        and were slower here (bench/preprocess.py); on CUDA it takes 64 at a time. ONNX Runtime
        takes ``onnx_step(threads)`` crops a call.
        """
        import torch

        if self.backend == "onnx":
            step = onnx_step(self.threads)
            outs = [torch.from_numpy(self.session.run(None, {"x": crops[i:i + step].float().contiguous().numpy()})[0])
                    for i in range(0, len(crops), step)]
        else:
            step = 64 if self.device.startswith("cuda") else 8
            outs = []
            with torch.inference_mode():
                for i in range(0, len(crops), step):
                    x = ((crops[i:i + step].to(self.device) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
                    outs.append(self.model(x).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 1408)
