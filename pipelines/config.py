"""The resolved preprocessing configuration: one dataclass per stage plus run options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipelines.stages.audio import AudioConfig
from pipelines.stages.face_features import FaceFeaturesConfig
from pipelines.stages.faces import FacesConfig
from pipelines.stages.frames import FramesConfig
from pipelines.stages.pack import PackConfig

ALL_STAGES = ("frames", "faces", "face_features", "audio", "pack")


@dataclass
class PreprocessConfig:
    root: str
    out: str
    splits: tuple[str, ...] = ("ogm",)
    stages: tuple[str, ...] = ALL_STAGES
    workers: int = 1
    device: str = "cpu"
    backend: str | None = None  # face networks: torch or onnx; None = the fastest installed (resolved at start)
    batch_size: int = 32  # face frames per MTCNN / EfficientNet batch
    chunk: int = 8  # clips per work unit
    overwrite: bool = False
    frames: FramesConfig = field(default_factory=FramesConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    face_features: FaceFeaturesConfig = field(default_factory=FaceFeaturesConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    def stage_configs(self) -> dict:
        """What changes outputs (paths, workers, devices and backends do not)."""
        return {name: asdict(getattr(self, name)) for name in ("frames", "faces", "face_features", "audio", "pack")}

    def as_dict(self) -> dict:
        return asdict(self)
