"""Stream shards into padded batches: webdataset stages that read top to bottom.

    shards -> (resample | split by node and worker) -> shuffle -> decode -> to model inputs
           -> batch with padding and masks

Training gives each rank its own slice of the shards (shuffled per epoch with a seed all
ranks share), each loader worker a slice of that, cycles through them, and cuts the epoch
at a fixed number of batches (``with_epoch``): every DDP rank sees the same number of
batches however uneven the shards are, so no rank waits forever in an all-reduce. With
fewer shards than ranks it falls back to resampling shards with replacement. Evaluation
reads each shard exactly once, split across ranks and workers, deterministically.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from avbalance.errors import UserError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
# modality -> the shard key it reads
SOURCES = {"spec": "spec.npy", "wav": "wav.npy", "frames": "frames.jpg", "face_feats": "face_feats.npy"}


@dataclass
class DataConfig:
    """What to read and how to batch it. ``modalities`` maps a modality name to its source:
    spec | wav | frames | face_feats."""

    modalities: dict[str, str] = field(default_factory=lambda: {"audio": "spec", "visual": "frames"})
    batch_size: int = 16
    workers: int = 2
    shuffle_buffer: int = 256
    frames: int = 3  # 1-fps frames per clip for frame encoders
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop at train time
    max_face_frames: int = 300  # longer sequences are cropped (randomly at train time)
    max_wav_seconds: float = 6.0
    samples_per_epoch: int | None = None  # default: the part's sample count


def split_folders(folder: str) -> list[str]:
    """Shard sets below ``folder`` when it is a preprocess output (``OUT/shards/<split>``) or its ``shards/``."""
    found = []
    for parent in (os.path.join(folder, "shards"), folder):
        if os.path.isdir(parent):
            found += [os.path.join(parent, d) for d in sorted(os.listdir(parent))
                      if os.path.exists(os.path.join(parent, d, "shards.json"))]
    return found


def read_index(shards: str) -> dict:
    path = os.path.join(shards, "shards.json")
    if not os.path.exists(path):
        splits = split_folders(shards)
        if splits:
            raise UserError(f"{shards} holds shard sets, one per split, but is not one itself: pass one of "
                            f"{', '.join(splits)} as --shards")
        raise UserError(f"no shards.json in {shards}: not a complete shard set; run `python cli.py preprocess` first")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def shard_urls(shards: str, part: str) -> tuple[list[str], int]:
    """The shard files of one part and its sample count, checked against the index."""
    index = read_index(shards)
    if part not in index["parts"]:
        raise UserError(f"{shards} has no {part!r} part (parts: {', '.join(index['parts'])})")
    urls = [os.path.join(shards, s["name"]) for s in index["parts"][part]["shards"]]
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise UserError(f"{len(missing)} shard(s) listed in {shards}/shards.json are missing, e.g. {missing[0]}")
    return urls, index["parts"][part]["samples"]


def check_sources(shards: str, cfg: DataConfig) -> None:
    keys = set(read_index(shards)["keys"])
    for modality, source in cfg.modalities.items():
        if source not in SOURCES:
            raise UserError(f"modality {modality!r}: unknown source {source!r}; choose from {', '.join(SOURCES)}")
        if SOURCES[source] not in keys:
            raise UserError(f"modality {modality!r} needs {SOURCES[source]}, which the shards in {shards} do not hold "
                            f"(keys: {', '.join(sorted(keys))})")


# --- per-sample decoding ------------------------------------------------------------------

def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def split_strip(data: bytes, meta: dict) -> list[torch.Tensor]:
    """The 1-fps frames of a ``frames.jpg`` strip, each (3, H, W) uint8."""
    strip = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.uint8).copy()).permute(2, 0, 1)
    count, stride = meta["frames"]["count"], meta["frames"]["stride"]
    width = meta.get("video", {}).get("width", stride)
    return [strip[:, :, k * stride:k * stride + width] for k in range(count)]


def frames_to_tensor(frames: list[torch.Tensor], cfg: DataConfig, train: bool, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 3, S, S) normalised frames and a (T,) mask.

    ``cfg.frames`` consecutive 1-fps frames, as the MLB paper samples them: a random window
    at train time with one random resized crop and flip for the whole clip (its frames stay
    aligned), the centred window at evaluation, resized and centre-cropped.
    """
    from torchvision.transforms.v2 import functional as F

    count = len(frames)
    height, width = frames[0].shape[1:]
    n = min(cfg.frames, count)
    start = rng.randint(0, count - n) if train else (count - n) // 2
    if train:
        area = height * width * rng.uniform(*cfg.crop_scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h = min(height, int(round(math.sqrt(area / aspect))))
        w = min(width, int(round(math.sqrt(area * aspect))))
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
        flip = rng.random() < 0.5
    tensors = []
    for frame in frames[start:start + n]:
        if train:
            frame = F.resized_crop(frame, top, left, h, w, [cfg.image_size, cfg.image_size], antialias=True)
            frame = frame.flip(-1) if flip else frame
        else:
            frame = F.center_crop(F.resize(frame, cfg.image_size, antialias=True), [cfg.image_size, cfg.image_size])
        tensors.append((frame.float() / 255 - IMAGENET_MEAN) / IMAGENET_STD)
    mask = torch.zeros(cfg.frames, dtype=torch.bool)
    mask[: len(tensors)] = True
    while len(tensors) < cfg.frames:  # short clips: repeat the last frame, masked out
        tensors.append(tensors[-1])
    return torch.stack(tensors), mask


def _worker_rng(seed: int) -> random.Random:
    """A generator per loader worker, so workers do not draw the same augmentations."""
    info = torch.utils.data.get_worker_info()
    return random.Random(seed * 1000 + (info.id if info is not None else 0))


def to_inputs(cfg: DataConfig, train: bool, seed: int = 0):
    """A map stage: raw sample bytes -> {"inputs": {m: {...}}, "label", "clip_id"}."""
    state: dict[str, random.Random] = {}

    def convert(sample: dict) -> dict:
        rng = state.setdefault("rng", _worker_rng(seed))
        meta = json.loads(sample["json"])
        sample["meta"] = meta
        inputs: dict[str, dict[str, torch.Tensor]] = {}
        for modality, source in cfg.modalities.items():
            if source == "spec":
                inputs[modality] = {"x": torch.from_numpy(_npy(sample["spec.npy"]).astype(np.float32))[None]}
            elif source == "wav":
                wav = _npy(sample["wav.npy"]).astype(np.float32) / 32768.0
                limit = int(cfg.max_wav_seconds * 16000)
                if len(wav) > limit:
                    start = rng.randrange(len(wav) - limit + 1) if train else 0
                    wav = wav[start:start + limit]
                inputs[modality] = {"x": torch.from_numpy(wav)}
            elif source == "face_feats":
                feats = _npy(sample["face_feats.npy"]).astype(np.float32)
                mask = _npy(sample["face_mask.npy"]).astype(bool)
                if len(feats) > cfg.max_face_frames:
                    start = rng.randrange(len(feats) - cfg.max_face_frames + 1) if train else 0
                    feats, mask = feats[start:start + cfg.max_face_frames], mask[start:start + cfg.max_face_frames]
                inputs[modality] = {"x": torch.from_numpy(feats), "mask": torch.from_numpy(mask)}
            elif source == "frames":
                frames, mask = frames_to_tensor(split_strip(sample["frames.jpg"], meta), cfg, train, rng)
                inputs[modality] = {"x": frames, "mask": mask}
        return {"inputs": inputs, "label": int(meta["label"]), "clip_id": meta["clip_id"]}

    return convert


# --- batching -----------------------------------------------------------------------------

def pad_stack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack along a new batch axis, padding axis 0 to the longest; mask True = real."""
    longest = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
    mask = torch.zeros(len(tensors), longest, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def collate(samples: list[dict]) -> dict:
    """Batch model inputs: fixed shapes are stacked; sequences padded with a mask."""
    batch_inputs: dict[str, dict[str, torch.Tensor]] = {}
    for modality in samples[0]["inputs"]:
        parts = [s["inputs"][modality] for s in samples]
        x = [p["x"] for p in parts]
        if all(t.shape == x[0].shape for t in x) and "mask" in parts[0]:
            batch_inputs[modality] = {"x": torch.stack(x), "mask": torch.stack([p["mask"] for p in parts])}
        elif all(t.shape == x[0].shape for t in x):
            batch_inputs[modality] = {"x": torch.stack(x)}
        else:
            padded, length_mask = pad_stack(x)
            if "mask" in parts[0]:
                inner, _ = pad_stack([p["mask"] for p in parts])
                length_mask = length_mask & inner
            batch_inputs[modality] = {"x": padded, "mask": length_mask}
    return {
        "inputs": batch_inputs,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "clip_id": [s["clip_id"] for s in samples],
    }


def _batched(size: int, partial: bool):
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) == size:
                yield collate(buf)
                buf = []
        if buf and partial:
            yield collate(buf)

    return stage


def _keep(keys: set[str]):
    def stage(src):
        for sample in src:
            yield {k: v for k, v in sample.items() if k in keys or k.startswith("__")}

    return stage


class RankShards(torch.utils.data.IterableDataset):
    """Endless shard URLs for one rank and one loader worker, reshuffled on every pass."""

    def __init__(self, urls: list[str], rank: int, world_size: int, seed: int, epoch: int) -> None:
        super().__init__()
        order = list(urls)
        random.Random(seed * 10_007 + epoch).shuffle(order)  # the same on every rank
        self.urls = order[rank::world_size]
        self.seed = seed * 10_007 + epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.urls[wid::nworkers]
        rng = random.Random(self.seed * 1_000_003 + wid)
        while True:
            rng.shuffle(mine)
            for url in mine:
                yield {"url": url}


def _fixed_worker_seed() -> int:
    """Worker index only: with the (seed, rank, epoch) stream seed this makes every worker's
    shard sequence reproducible, independent of torch's global RNG."""
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def make_loader(shards: str, part: str, cfg: DataConfig, train: bool, rank: int = 0, world_size: int = 1,
                seed: int = 0, epoch: int = 0) -> tuple[wds.WebLoader, int]:
    """A loader over one part and the number of batches it yields per rank per epoch.

    Training streams are seeded by (seed, rank, epoch): ranks read different samples, and
    re-creating the loader for an epoch replays it exactly (resume restarts at an epoch).
    """
    urls, n_samples = shard_urls(shards, part)
    check_sources(shards, cfg)
    keys = {"json"} | {SOURCES[s] for s in cfg.modalities.values()}
    if "face_feats" in cfg.modalities.values():
        keys.add("face_mask.npy")
    workers = min(cfg.workers, len(urls))
    if train:
        per_epoch = cfg.samples_per_epoch or n_samples
        n_batches = max(1, per_epoch // (cfg.batch_size * world_size))
        stream_seed = (seed * 1_000_003 + rank) * 10_007 + epoch
        if len(urls) >= world_size:
            workers = max(1, min(cfg.workers, len(urls) // world_size))  # every worker owns a shard
            source = RankShards(urls, rank, world_size, seed, epoch)
        else:
            source = wds.ResampledShards(urls, seed=stream_seed, worker_seed=_fixed_worker_seed, deterministic=True)
        dataset = wds.DataPipeline(
            source,
            wds.tarfile_to_samples(),
            _keep(keys),
            wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 64), rng=random.Random(stream_seed)),
            wds.map(to_inputs(cfg, train=True, seed=stream_seed)),
            _batched(cfg.batch_size, partial=False),
        )
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
        return loader.with_epoch(n_batches), n_batches
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        _keep(keys),
        wds.map(to_inputs(cfg, train=False)),
        _batched(cfg.batch_size, partial=True),
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
    return loader, math.ceil(n_samples / (cfg.batch_size * world_size))
