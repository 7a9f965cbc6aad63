"""The resolved preprocessing configuration: one dataclass per shipped stage plus run options.

A stage without a field here runs with its ``Config`` defaults (``Stage.config_of``). The
stages, their order and their checks come from the stage registry (``pipelines/stages/base.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipelines.stages.audio import AudioConfig
from pipelines.stages.base import stage_order
from pipelines.stages.face_features import FaceFeaturesConfig
from pipelines.stages.faces import FacesConfig
from pipelines.stages.flow import FlowConfig
from pipelines.stages.frames import FramesConfig
from pipelines.stages.pack import PackConfig

ALL_STAGES = tuple(stage_order())  # frames, flow, faces, face_features, audio, pack (and any stage added)


@dataclass
class PreprocessConfig:
    root: str
    out: str
    corpus: str = "cremad"  # a recipe name (pipelines/recipes/)
    recipe_options: dict = field(default_factory=dict)  # the recipe's own options (its CLI flags)
    splits: tuple[str, ...] = ("ogm",)
    stages: tuple[str, ...] = ALL_STAGES
    workers: int = 1
    device: str = "cpu"
    backend: str = "auto"  # face networks: torch, onnx, or auto (onnx on CPU when installed; resolved at start)
    batch_size: int = 32  # face frames per MTCNN / EfficientNet batch
    chunk: int = 8  # clips per work unit
    overwrite: bool = False
    engine: str = "local"  # where work runs: local (process pool) or ray
    ray_address: str | None = None  # --engine ray: auto or HOST:PORT; None starts a local runtime
    frames: FramesConfig = field(default_factory=FramesConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    face_features: FaceFeaturesConfig = field(default_factory=FaceFeaturesConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    def as_dict(self) -> dict:
        return asdict(self)
