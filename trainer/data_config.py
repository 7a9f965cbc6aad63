"""``DataConfig``: the ``data`` section of a run's config, and what the loader reads.

One definition: each field's default, type, allowed values and help are the ``data.*`` keys
of the YAML files and of ``--set`` (``trainer/run_config.py`` gathers the sections;
``trainer/config.py`` derives its defaults and range checks from them). Nothing here reads
shards; the values are checked where the config is read (``trainer/config.py``).

Building one resolves what the loader needs resolved: ``frame_sampling`` None (the shard
set's corpus default, when ``train`` has not filled it in) reads as ``consecutive``,
``exclude_quality`` becomes a tuple, ``modalities`` a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avbalance.ranges import Allowed, setting
from avbalance.shard_format import QUALITY_FLAGS


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to read and how to batch it. ``modalities`` maps a modality name to its source:
    spec | wav | frames | face_feats | flow."""

    train_part: str = setting("train", "the part trained on")
    val_part: str = setting("val", "the part validated on every epoch; falls back to test when the split has "
                                   "no val part (ogm)")
    test_part: str = setting("test", "the part the best checkpoint is tested on")
    modalities: dict[str, str] = setting(
        {"audio": "spec", "visual": "frames"},
        "modality -> shard source (spec | wav | frames | face_feats | flow); setting it replaces the mapping "
        "and keeps only those modalities' encoders", free_form=True)
    batch_size: int = setting(16, "samples per batch (per process under torchrun)", Allowed(lo=1))
    workers: int = setting(2, "loader worker processes (0: read in the training process)", Allowed(lo=0))
    shuffle_buffer: int = setting(256, "samples in the shuffle buffer", Allowed(lo=0))
    frames: int = setting(3, "1-fps frames per clip for frame encoders", Allowed(lo=1))
    frame_sampling: str | None = setting(
        None, "consecutive (MLB, CREMA-D) or spread (OGM-GE's AVE/KS loaders) frames; null: the shard set's "
              "corpus default, else consecutive", Allowed(choices=("consecutive", "spread"), optional=True))
    image_size: int = setting(224, "frame side in pixels after the crop", Allowed(lo=16))
    max_face_frames: int = setting(300, "longer face-feature sequences are cropped (randomly at train time)",
                                   Allowed(lo=1))
    max_wav_seconds: float = setting(6.0, "longer waveforms are cropped (randomly at train time)",
                                     Allowed(lo=0, lo_open=True))
    samples_per_epoch: int | None = setting(None, "training samples per epoch; null: the train part's count",
                                            Allowed(lo=1, optional=True))
    exclude_quality: tuple[str, ...] = setting(
        (), f"quality flags whose samples are dropped: {', '.join(QUALITY_FLAGS)} (docs/shards.md); none: the "
            "published protocol keeps every clip")
    on_corrupt: str = setting("error", "error: a damaged shard or sample stops the run; skip: it is skipped "
                                       "and counted", Allowed(choices=("error", "skip")))
    prefetch: int = setting(2, "batches each loader worker keeps ready", Allowed(lo=1))
    persistent_workers: bool = setting(True, "loader workers live across epochs")
    pin_memory: bool = setting(True, "CUDA: page-locked batches, non-blocking copies")
    jpeg_decode: str = setting("cpu", "cpu: loader workers decode the frames; cuda: the training GPU does (nvJPEG)",
                               Allowed(choices=("cpu", "cuda")))
    shards: str | None = setting(None, "the shard set the run read (its folder or URL), written by train",
                                 recorded=True)

    # Not a setting: the random resized crop's area range at train time.
    crop_scale: ClassVar[tuple[float, float]] = (0.5, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", dict(self.modalities))
        object.__setattr__(self, "frame_sampling", self.frame_sampling or "consecutive")
        object.__setattr__(self, "exclude_quality", tuple(self.exclude_quality or ()))
