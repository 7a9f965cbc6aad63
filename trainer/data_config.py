"""``DataConfig``: what the loader reads and how it batches it (the ``data`` section of a
run's config, as ``trainer/loop.py`` ``data_config`` builds it). Only the fields and their
defaults: nothing here reads shards or checks values (``trainer/config.py`` does)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """What to read and how to batch it. ``modalities`` maps a modality name to its source:
    spec | wav | frames | face_feats | flow."""

    modalities: dict[str, str] = field(default_factory=lambda: {"audio": "spec", "visual": "frames"})
    batch_size: int = 16
    workers: int = 2
    shuffle_buffer: int = 256
    frames: int = 3  # 1-fps frames per clip for frame encoders
    frame_sampling: str = "consecutive"  # consecutive (MLB, CREMA-D) | spread (OGM-GE's AVE/KS loaders)
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop at train time
    max_face_frames: int = 300  # longer sequences are cropped (randomly at train time)
    max_wav_seconds: float = 6.0
    samples_per_epoch: int | None = None  # default: the part's sample count
    exclude_quality: tuple[str, ...] = ()  # drop samples with any of these quality flags
    on_corrupt: str = "error"  # error | skip: what a damaged shard or sample does
    prefetch: int = 2  # batches each loader worker keeps ready
    persistent_workers: bool = True  # keep loader workers alive across epochs
    pin_memory: bool = True  # page-locked batches and non-blocking copies (CUDA only)
    jpeg_decode: str = "cpu"  # cpu (loader workers) | cuda (batched nvJPEG on the training device)
