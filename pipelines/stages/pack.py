"""pack: one WebDataset shard set per split, from the per-clip stage caches.

Sample keys (docs/shards.md has dtypes and shapes): ``frames.jpg`` (the 1-fps frames side
by side), ``flow_x.jpg`` / ``flow_y.jpg`` (quantised optical flow side by side), optional ``faces.jpg`` (face crops side by side), ``face_feats.npy``,
``face_mask.npy``, ``face_boxes.npy``, ``face_times.npy``, ``wav.npy``, ``spec.npy``,
``cls`` and ``json``. Every sample of a shard set has the same keys; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from avbalance import shard_format as F
from pipelines.stages.base import STAGES, Stage
from pipelines.stages.frames import encode_strip, unpack_blobs


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


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def jpeg_strip(jpegs: list[bytes | None], quality: int, size: int) -> tuple[bytes, int]:
    """Face crops (``size`` square JPEG each, ``None`` = no face) side by side in one JPEG."""
    images = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) if j is not None else None for j in jpegs]
    return encode_strip(images, quality, blank=(size, size))


@STAGES.register("pack")
class PackStage(Stage):
    version = 2  # 2: clips with a missing modality are packed with placeholders and ``quality`` flags
    inputs = ()

    def sample(self, clip: dict, outputs: dict[str, dict[str, np.ndarray]], quality: dict[str, dict] | None = None,
               meta: dict | None = None) -> dict[str, bytes | str]:
        """One shard sample from a manifest record, its stage outputs (placeholders where a
        modality did not decode: ``quality.placeholder``), its quality flags and the record's
        fields for the sample's json (``Recipe.sample_meta``; default: the generic ones)."""
        if meta is None:
            from pipelines.recipes.base import Recipe

            meta = Recipe().sample_meta(clip)
        meta = dict(meta)
        sample: dict[str, bytes | str] = {"__key__": clip["clip_id"], "cls": str(clip["label"]).encode()}
        if "frames" in outputs:
            out = outputs["frames"]
            sample[F.FRAMES] = out["strip"].tobytes()
            meta["frames"] = {"count": int(len(out["times"])), "stride": int(out["stride"]), "times": [round(float(t), 3) for t in out["times"]]}
        if "flow" in outputs:
            out = outputs["flow"]
            sample[F.FLOW_X], sample[F.FLOW_Y] = out["x_strip"].tobytes(), out["y_strip"].tobytes()
            meta["flow"] = {"count": int(len(out["times"])), "stack": int(out["stack"]), "stride": int(out["stride"]),
                            "bound": float(out["bound"]), "times": [round(float(t), 3) for t in out["times"]],
                            "pairs": [int(p) for p in out["pairs"]]}
        if "faces" in outputs:
            out = outputs["faces"]
            sample[F.FACE_MASK] = npy_bytes(out["mask"].astype(np.uint8))
            sample[F.FACE_BOXES] = npy_bytes(out["boxes"].astype(np.float32))
            sample[F.FACE_TIMES] = npy_bytes(out["times"].astype(np.float32))
            meta["faces"] = {"count": int(len(out["mask"])), "found": int(out["mask"].sum())}
            if "crops_jpeg" in out:
                found = iter(unpack_blobs(out["crops_jpeg"], out["crops_offsets"]))
                tiles = [next(found) if m else None for m in out["mask"]]  # black where no face
                sample[F.FACES], meta["faces"]["stride"] = jpeg_strip(tiles, self.config.jpeg_quality, int(out["crop_size"]))
        if "face_features" in outputs:
            sample[F.FACE_FEATS] = npy_bytes(outputs["face_features"]["feats"].astype(np.float16))
        if "audio" in outputs:
            out = outputs["audio"]
            sample[F.WAV] = npy_bytes(out["wav"].astype(np.int16))
            sample[F.SPEC] = npy_bytes(out["spec"].astype(np.float16))
            meta["audio"] = {"seconds": round(len(out["wav"]) / 16000, 4), "source": clip.get("audio_source", "wav" if "wav" in clip["files"] else "video")}
        for stage in ("frames", "flow", "faces"):
            if stage in outputs and "video_info" in outputs[stage]:
                fps, width, height, n_frames, duration = outputs[stage]["video_info"].tolist()[:5]
                meta["video"] = {"fps": round(fps, 3), "width": int(width), "height": int(height), "frames": int(n_frames), "seconds": round(duration, 4)}
        meta["quality"] = quality or {}
        sample["json"] = json.dumps(meta, sort_keys=True).encode()
        return sample
