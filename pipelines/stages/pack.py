"""pack: one WebDataset shard set per split, from the per-clip stage caches.

Sample keys (docs/shards.md has dtypes and shapes): ``frames.jpg`` (the 1-fps frames side
by side), ``flow_x.jpg`` / ``flow_y.jpg`` (quantised optical flow side by side), optional ``faces.jpg`` (face crops side by side), ``face_feats.npy``,
``face_mask.npy``, ``face_boxes.npy``, ``face_times.npy``, ``wav.npy``, ``spec.npy``,
``cls`` and ``json``. Each stage's ``pack`` hook writes its own members and json fields (a
stage without one: ``<stage>_<array>.npy`` per array). Every sample of a shard set has the
same keys; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.stages.base import STAGES, Stage, npy_bytes  # noqa: F401  (npy_bytes: part of this module's API)
from pipelines.stages.frames import encode_strip


@dataclass(frozen=True)
class PackConfig:
    samples_per_shard: int | None = None  # None: derived from shard_mb and min_shards (samples_per_shard)
    shard_mb: float = 256.0  # target shard size for streaming (webdataset: 100 MB - 1 GB)
    min_shards: int = 16  # per part, when the part is large enough; a cluster wants ranks x loader workers
    jpeg_quality: int = 90


MIN_SHARD_SAMPLES = 8  # fewer samples a shard and opening shards (a request each when remote) dominates


def samples_per_shard(n: int, cfg: PackConfig, sample_bytes: int | None = None) -> int:
    """Samples per shard for a part of ``n`` samples of about ``sample_bytes`` each.

    ``--shard-samples`` when given; else as many samples as fill ``shard_mb``, but no more
    than keeps ``min_shards`` shards in the part (so every reader of a cluster, rank x
    loader worker, owns a shard), and never under ``MIN_SHARD_SAMPLES``.
    """
    if cfg.samples_per_shard:
        return cfg.samples_per_shard
    by_size = max(1, int(cfg.shard_mb * 2**20 // sample_bytes)) if sample_bytes else n
    return max(MIN_SHARD_SAMPLES, min(by_size, math.ceil(n / cfg.min_shards)))


def sample_bytes(sample: dict[str, bytes | str]) -> int:
    """The bytes a sample adds to a shard (tar headers aside)."""
    return sum(len(v) for k, v in sample.items() if k != "__key__")


def shard_order(clip_ids: list[str]) -> list[str]:
    """A fixed pseudo-random order, so each shard mixes actors and emotions."""
    return sorted(clip_ids, key=lambda c: hashlib.sha1(c.encode()).hexdigest())


def jpeg_strip(jpegs: list[bytes | None], quality: int, size: int) -> tuple[bytes, int]:
    """Face crops (``size`` square JPEG each, ``None`` = no face) side by side in one JPEG."""
    images = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) if j is not None else None for j in jpegs]
    return encode_strip(images, quality, blank=(size, size))


@STAGES.register("pack")
class PackStage(Stage):
    """The final stage: the runner packs each split from the per-clip caches (every stage's
    ``pack`` hook gives its members and json fields)."""

    version = 2  # 2: clips with a missing modality are packed with placeholders and ``quality`` flags
    inputs = ()
    Config = PackConfig
    per_clip = False

    def sample(self, clip: dict, outputs: dict[str, dict[str, np.ndarray]], quality: dict[str, dict] | None = None,
               meta: dict | None = None) -> dict[str, bytes | str]:
        """One shard sample from a manifest record, its stage outputs in stage order
        (placeholders where a modality did not decode: ``Stage.placeholder``), its quality flags
        and the record's fields for the sample's json (``Recipe.sample_meta``; default: the
        generic ones)."""
        if meta is None:
            from pipelines.recipes.base import Recipe

            meta = Recipe().sample_meta(clip)
        meta = dict(meta)
        sample: dict[str, bytes | str] = {"__key__": clip["clip_id"], "cls": str(clip["label"]).encode()}
        for stage, out in outputs.items():
            members, fields = STAGES.get(stage).pack(out, clip, self.config)
            sample.update(members)
            meta.update(fields)
        for out in outputs.values():  # the video as the last stage that decoded it saw it
            if "video_info" in out:
                fps, width, height, n_frames, duration = out["video_info"].tolist()[:5]
                meta["video"] = {"fps": round(fps, 3), "width": int(width), "height": int(height), "frames": int(n_frames), "seconds": round(duration, 4)}
        meta["quality"] = quality or {}
        sample["json"] = json.dumps(meta, sort_keys=True).encode()
        return sample
