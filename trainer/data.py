"""Stream shards into padded batches: webdataset stages that read top to bottom.

    shards -> (resample | split by node and worker) -> shuffle -> decode -> to model inputs
           -> batch with padding and masks

Damaged data never ends in a traceback: a shard that cannot be read to its end, or a sample
that does not decode, becomes a record naming the shard and the sample key that travels
down the stream (also out of loader workers) to ``GuardedLoader``, which raises a clear
error (``on_corrupt="error"``) or logs and counts it (``"skip"``).

Training gives each rank its own slice of the shards (shuffled per epoch with a seed all
ranks share), each loader worker a slice of that, cycles through them, and cuts the epoch
at a fixed number of batches (each worker stops at its share): every DDP rank sees the
same number of batches however uneven the shards are, so no rank waits forever in an
all-reduce. With fewer shards than ranks it falls back to resampling shards with
replacement. Evaluation reads each shard exactly once, split across ranks and workers,
deterministically. The training loader is made once per run; ``set_epoch`` reseeds it and
its workers live on (``data.persistent_workers``).

Workers only decode and cut: inputs leave them in their stored dtypes and become float32
on the training device (``trainer/device_batch.py``, ``trainer/transforms.py``).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
import random
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from avbalance import remote, shard_format
from avbalance.errors import UserError
from avbalance.invocation import prog
from avbalance.shard_format import COMPANIONS, SOURCES, incomplete_parts
from trainer import tar_members
from trainer.batch_pool import SLOTS_KEY, BatchPool, new_pass, pooled_stack, slots_for, worker_pool
from trainer.device_batch import DeviceLoader, EpochStream, LoaderPlan, plan_for
from trainer.flow_input import split_flow
from trainer.transforms import Cut, cut_frames, decode_strip, draw_cut, strip_frames, strip_layout

MIN_WAV_SECONDS = 1.0  # shorter waveforms are tiled to this length at load time
SHARED_MIN_ELEMENTS = 1 << 16  # smaller batch tensors are stacked as usual (a segment each costs more than the copy)


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


def split_folders(folder: str) -> list[str]:
    """Shard sets below ``folder`` when it is a preprocess output (``OUT/shards/<split>``) or its ``shards/``."""
    found = []
    for parent in (os.path.join(folder, "shards"), folder):
        if os.path.isdir(parent):
            found += [os.path.join(parent, d) for d in sorted(os.listdir(parent))
                      if os.path.exists(os.path.join(parent, d, shard_format.INDEX))]
    return found


def read_index(shards: str) -> dict:
    """``shards.json`` of the set at ``shards`` (a folder or a URL: avbalance.remote)."""
    index = shard_format.read_index(shards)
    if index is None:
        splits = [] if remote.is_remote(shards) else split_folders(shards)
        if splits:
            raise UserError(f"{shards} holds shard sets, one per split, but is not one itself: pass one of "
                            f"{', '.join(splits)} as --shards")
        raise UserError(f"no shards.json in {shards}: not a complete shard set; run `{prog()} preprocess` first")
    return index


def shard_urls(shards: str, part: str, on_corrupt: str = "error") -> tuple[list[str], int]:
    """The shard files of one part and its sample count, checked against the index: every
    listed shard must exist with the size the index records (cheap: no reading)."""
    index = read_index(shards)
    if part not in index["parts"]:
        raise UserError(f"{shards} has no {part!r} part (parts: {', '.join(index['parts'])})")
    listed = index["parts"][part]["shards"]
    urls = [remote.join(shards, s["name"]) for s in listed]
    sizes = remote.sizes(urls)  # a stat per shard; HEAD requests at a URL
    missing = [u for u, size in zip(urls, sizes) if size is None]
    if missing:
        raise UserError(f"{len(missing)} shard(s) listed in {shards}/shards.json are missing, e.g. {missing[0]}")
    for entry, url, size in zip(listed, urls, sizes):
        if "bytes" in entry and size != entry["bytes"] and size != -1:  # -1: pipe:, size unknown
            message = (f"shard {url} is {size} bytes but shards.json records {entry['bytes']}: it is damaged or cut "
                       f"short. Check the set with `{prog()} verify-shards {shards}` and re-create it with "
                       f"`{prog()} preprocess` (finished stages are cached)")
            if on_corrupt != "skip":
                raise UserError(message + "; data.on_corrupt=skip reads what it can and counts the samples lost")
            _warn_once(url, "warning: " + message + "; data.on_corrupt=skip: its unreadable samples are skipped and counted")
    return urls, index["parts"][part]["samples"]


def excluded_ids(index: dict, part: str, flags: tuple[str, ...]) -> dict[str, list[str]]:
    """Flag -> the ids of ``part`` that ``data.exclude_quality`` drops for it (from shards.json)."""
    if not flags:
        return {}
    quality = index["parts"][part].get("quality")
    if quality is None:
        raise UserError(f"data.exclude_quality needs shards with quality flags; {index.get('split')} shards were written "
                        f"by an older version (schema {index.get('schema_version')}): re-run `{prog()} preprocess`")
    return {f: quality[f] for f in flags if quality.get(f)}


def preflight(shards: str, parts: list[str], cfg: DataConfig) -> list[str]:
    """Checks before training, on every part it will read: shard sizes (errors, or warnings
    with ``on_corrupt="skip"``), parts missing clips their split list names, and what
    ``exclude_quality`` drops. Returns the lines to show the user."""
    index = read_index(shards)
    lines = []
    for part in dict.fromkeys(parts):
        shard_urls(shards, part, cfg.on_corrupt)
    lines += [f"warning: {shards}: {line}" for line in incomplete_parts(index, list(dict.fromkeys(parts)))]
    if cfg.exclude_quality:
        for part in dict.fromkeys(parts):
            by_flag = excluded_ids(index, part, cfg.exclude_quality)
            dropped = len({i for ids in by_flag.values() for i in ids})
            counts = ", ".join(f"{f} {len(ids)}" for f, ids in by_flag.items()) or "none flagged"
            lines.append(f"data: part {part!r} drops {dropped} of {index['parts'][part]['samples']} samples "
                         f"(data.exclude_quality: {counts})")
    return lines


def check_sources(shards: str, cfg: DataConfig) -> None:
    keys = set(read_index(shards)["keys"])
    for modality, source in cfg.modalities.items():
        if source not in SOURCES:
            raise UserError(f"modality {modality!r}: unknown source {source!r}; choose from {', '.join(SOURCES)}")
        if SOURCES[source] not in keys:
            raise UserError(f"modality {modality!r} needs {SOURCES[source]}, which the shards in {shards} do not hold "
                            f"(keys: {', '.join(sorted(keys))})")


# --- per-sample decoding ------------------------------------------------------------------

NPY_HEADER = re.compile(r"^\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (True|False), 'shape': \(([\d, ]*)\), \}\s*$")


def _npy(data: bytes) -> np.ndarray:
    """A ``.npy`` member as an array (never pickled objects). The header of a plain array, as
    numpy writes it, is parsed here directly: ``np.load`` evaluates it with ``ast``, which
    costs as much as reading the array; anything else goes through ``np.load``."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        size = int.from_bytes(data[8:10], "little")
        match = NPY_HEADER.match(data[10:10 + size].decode("latin1"))
        if match:
            shape = tuple(int(n) for n in match[3].replace(" ", "").split(",") if n)
            array = np.frombuffer(data, np.dtype(match[1]), count=math.prod(shape), offset=10 + size)
            return array.reshape(shape, order="F" if match[2] == "True" else "C").copy()
    return np.load(io.BytesIO(data), allow_pickle=False)


def frames_input(data: bytes, meta: dict, cfg: DataConfig, train: bool, rng: random.Random,
                 jpeg_on_device: bool) -> dict[str, torch.Tensor]:
    """A clip's frames as the worker hands them over: ``cfg.frames`` 1-fps frames cut from
    the strip (``cfg.frame_sampling``; trainer/transforms.py), uint8 (T, 3, S, S) with a (T,)
    mask; or, when the device decodes (``data.jpeg_decode=cuda``), the strip's bytes and the
    drawn cut."""
    count, stride, width = strip_layout(meta)
    if jpeg_on_device:
        height = Image.open(io.BytesIO(data)).height  # the header only; a file that is no image fails here, named
        cut = draw_cut(count, stride, width, height, cfg.frames, cfg.crop_scale, train, rng, cfg.frame_sampling)
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "cut": cut.as_tensor()}
    strip = decode_strip(data)  # bytes that are no JPEG fail here, named
    cut = draw_cut(count, stride, width, strip.shape[1], cfg.frames, cfg.crop_scale, train, rng, cfg.frame_sampling)
    x, mask = cut_frames(strip, cut, cfg.frames, cfg.image_size)
    return {"x": x, "mask": mask}


def flow_input(x_jpeg: bytes, y_jpeg: bytes, meta: dict, cfg: DataConfig, train: bool,
               rng: random.Random) -> dict[str, torch.Tensor]:
    """A clip's flow slots cut as frames are (same window, crop and flip draws), uint8
    (T, 2k, S, S) with a (T,) mask and whether the crop was flipped: the device turns them
    into signed flow (``transforms.normalize_flow``), negating x where flipped."""
    slots = split_flow(x_jpeg, y_jpeg, meta)
    channels = 2 * meta["flow"]["stack"]
    height, width = (slots[0].shape[1:] if slots else (0, 0))
    cut = draw_cut(len(slots), width, width, height, cfg.frames, cfg.crop_scale, train, rng, cfg.frame_sampling)
    x, mask = cut_frames(slots, cut, cfg.frames, cfg.image_size, channels)
    return {"x": x, "mask": mask, "flip": torch.tensor(cut.flip)}


def split_strip(data: bytes, meta: dict) -> list[torch.Tensor]:
    """The 1-fps frames of a ``frames.jpg`` strip, each (3, H, W) uint8."""
    count, stride, width = strip_layout(meta)
    return strip_frames(decode_strip(data), Cut(count, stride, width))


def tile_short(wav: np.ndarray, length: int) -> np.ndarray:
    """A waveform shorter than ``length`` repeated to that length, as the reference loaders
    tile short clips (stored as they are: quality flag ``short``); an empty one is silence."""
    if len(wav) >= length:
        return wav
    if len(wav) == 0:
        return np.zeros(length, wav.dtype)
    return np.tile(wav, -(-length // len(wav)))[:length]


def _worker_rng(seed: int) -> random.Random:
    """A generator per loader worker, so workers do not draw the same augmentations."""
    info = torch.utils.data.get_worker_info()
    return random.Random(seed * 1000 + (info.id if info is not None else 0))


def to_inputs(cfg: DataConfig, train: bool, seed: int = 0, jpeg_on_device: bool = False):
    """A map stage: raw sample bytes -> {"inputs": {m: {...}}, "label", "clip_id"}.

    Each input stays in its stored dtype (frames uint8, spectrogram and face features
    float16, waveform int16): the worker only cuts, ``device_batch.finish`` converts on the
    training device, batched, to the float32 the model reads.
    """
    state: dict[str, random.Random] = {}

    def convert(sample: dict) -> dict:
        rng = state.setdefault("rng", _worker_rng(seed))
        meta = json.loads(sample["json"])
        sample["meta"] = meta
        inputs: dict[str, dict[str, torch.Tensor]] = {}
        for modality, source in cfg.modalities.items():
            if source == "spec":
                inputs[modality] = {"x": torch.from_numpy(_npy(sample[shard_format.SPEC]))[None]}
            elif source == "wav":
                wav = tile_short(_npy(sample[shard_format.WAV]), int(MIN_WAV_SECONDS * 16000))
                limit = int(cfg.max_wav_seconds * 16000)
                if len(wav) > limit:
                    start = rng.randrange(len(wav) - limit + 1) if train else 0
                    wav = wav[start:start + limit]
                inputs[modality] = {"x": torch.from_numpy(np.ascontiguousarray(wav))}
            elif source == "face_feats":
                feats = _npy(sample[shard_format.FACE_FEATS])
                mask = _npy(sample[shard_format.FACE_MASK]).astype(bool)
                if len(feats) > cfg.max_face_frames:
                    start = rng.randrange(len(feats) - cfg.max_face_frames + 1) if train else 0
                    feats, mask = feats[start:start + cfg.max_face_frames], mask[start:start + cfg.max_face_frames]
                inputs[modality] = {"x": torch.from_numpy(np.ascontiguousarray(feats)), "mask": torch.from_numpy(mask)}
            elif source == "frames":
                inputs[modality] = frames_input(sample[shard_format.FRAMES], meta, cfg, train, rng, jpeg_on_device)
            elif source == "flow":
                inputs[modality] = flow_input(sample[shard_format.FLOW_X], sample[shard_format.FLOW_Y], meta, cfg, train, rng)
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


def stack(tensors: list[torch.Tensor], slots: list | None = None, where: tuple[str, str] = ("", "x")) -> torch.Tensor:
    """``torch.stack``; in a loader worker, straight into shared memory. A batch leaves the
    worker through shared memory, and a tensor already there is handed over as it is instead
    of being copied into a fresh segment: one write of the batch instead of two. With the
    loader's ``BatchPool`` the segment is one of the worker's reused slots (no new pages to
    fault in); the slot is recorded in ``slots`` with ``where`` the tensor sits in the batch."""
    info = torch.utils.data.get_worker_info()
    if info is None or tensors[0].numel() * len(tensors) < SHARED_MIN_ELEMENTS:
        return torch.stack(tensors)
    pool, worker = worker_pool() or (None, info.id)
    out, taken = pooled_stack(tensors, pool, worker)
    if taken is not None and slots is not None:
        slots.append((worker, *taken, *where))
    return out


def collate(samples: list[dict]) -> dict:
    """Batch model inputs: fixed shapes are stacked; sequences padded with a mask. Pool slots
    the batch's tensors occupy are listed under ``SLOTS_KEY`` (``trainer/batch_pool.py``)."""
    batch_inputs: dict[str, dict[str, torch.Tensor]] = {}
    slots: list[tuple[int, int, int, str, str]] = []
    for modality in samples[0]["inputs"]:
        parts = [s["inputs"][modality] for s in samples]
        if "jpeg" in parts[0]:  # decoded on the device: the strips' bytes differ in length
            batch_inputs[modality] = {"jpeg": [p["jpeg"] for p in parts], "cut": torch.stack([p["cut"] for p in parts])}
            continue
        x = [p["x"] for p in parts]
        extra = {k: torch.stack([p[k] for p in parts]) for k in parts[0] if k not in ("x", "mask")}  # flow's flips
        if all(t.shape == x[0].shape for t in x) and "mask" in parts[0]:
            batch_inputs[modality] = {"x": stack(x, slots, (modality, "x")), "mask": torch.stack([p["mask"] for p in parts]),
                                      **extra}
        elif all(t.shape == x[0].shape for t in x):
            batch_inputs[modality] = {"x": stack(x, slots, (modality, "x"))}
        else:
            padded, length_mask = pad_stack(x)
            if "mask" in parts[0]:
                inner, _ = pad_stack([p["mask"] for p in parts])
                length_mask = length_mask & inner
            batch_inputs[modality] = {"x": padded, "mask": length_mask}
    batch = {
        "inputs": batch_inputs,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "clip_id": [s["clip_id"] for s in samples],
    }
    if slots:
        batch[SLOTS_KEY] = slots
    return batch


def _batched(size: int, partial: bool):
    """Collate ``size`` samples a batch; damage records ride on the next batch (training
    streams never end), or on a batch of their own at the end of an evaluation stream."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        buf: list[dict] = []
        damaged: list[dict] = []
        for sample in src:
            if "__corrupt__" in sample:
                damaged.append(sample["__corrupt__"])
                if sample["__corrupt__"].get("fatal"):
                    yield {"corrupt": damaged}
                    return
                continue
            buf.append(sample)
            if len(buf) == size:
                yield {**collate(buf), "corrupt": damaged}
                buf, damaged = [], []
        if buf and partial:
            yield {**collate(buf), "corrupt": damaged}
            damaged = []
        if damaged:
            yield {"corrupt": damaged}

    return stage


def _keep(keys: set[str], exclude: set[str]):
    """Only the members the model reads; samples ``data.exclude_quality`` drops are left out."""
    def stage(src):
        for sample in src:
            if sample.get("__key__") in exclude:
                continue
            yield {k: v for k, v in sample.items() if k in keys or k.startswith("__")}

    return stage


def read_shards(expected: dict[str, int], keys: set[str] | None = None):
    """Tar members -> samples ({"__key__", "__url__", member name: bytes}), shard by shard;
    with ``keys``, only those members are read (the others' bytes are skipped).

    A shard that cannot be read to its end (cut short, bad header) yields one damage record
    naming it, the sample key where reading stopped and how many samples it lost (from the
    index's per-shard ``expected`` counts), instead of a ``tarfile.ReadError`` traceback.
    """
    def wanted(path: str) -> bool:
        return keys is None or os.path.basename(path).partition(".")[2] in keys

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        read_any, unreadable = False, set()
        for item in src:
            url = item["url"]
            if url in unreadable and not read_any:
                # Training cycles its shards for ever: when they all fail, say so instead of spinning.
                yield {"__corrupt__": {"shard": url, "key": "(any)", "samples": 0, "fatal": True,
                                       "reason": "no shard this loader reads holds a readable sample"}}
                return
            count, key, current = 0, None, None
            try:
                with remote.open_stream(url) as fh:
                    for path, data in tar_members.members(fh, wanted):
                        key, _, name = os.path.basename(path).partition(".")
                        if current is not None and current["__key__"] != key:
                            yield current
                            count += 1
                            current = None
                        if current is None:
                            current = {"__key__": key, "__url__": url, "__pass__": item.get("pass", 0)}
                        if data is not None:
                            current[name] = data
                if current is not None:
                    yield current
                    count += 1
                read_any = read_any or count > 0
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                read_any = read_any or count > 0
                unreadable.add(url)
                total = expected.get(url)
                lost = f"{total - count} of its {total} samples" if total is not None else "the rest of its samples"
                yield {"__corrupt__": {"shard": url, "key": key or "(first sample)", "samples": max(1, (total or count + 1) - count),
                                       "reason": f"the shard cannot be read past this sample ({err}): it is cut short or "
                                                 f"damaged; {lost} are lost"}}

    return stage


def _guard(convert):
    """A map stage that turns a sample that does not decode into a damage record."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            if "__corrupt__" in sample:
                yield sample
                continue
            try:
                yield convert(sample)
            except Exception as err:  # noqa: BLE001 - any decoding failure of bad bytes
                what = f"missing member {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
                what = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", what)  # PIL names its buffer
                yield {"__corrupt__": {"shard": sample.get("__url__", "?"), "key": sample.get("__key__", "?"),
                                       "samples": 1, "reason": f"the sample does not decode ({what})"}}

    return stage


_WARNED: set = set()


def _warn_once(what, message: str) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        print(message, file=sys.stderr, flush=True)


class CorruptLog:
    """Damaged samples skipped in this process (``on_corrupt="skip"``), each counted once."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], dict] = {}

    def add(self, record: dict) -> None:
        where = (record["shard"], record["key"])
        if where not in self.records:
            self.records[where] = record
            _warn_once(where, f"warning: skipped {record['samples']} sample(s) at {record['key']} in {record['shard']}: "
                              f"{record['reason']} (data.on_corrupt=skip)")

    @property
    def count(self) -> int:
        return sum(r["samples"] for r in self.records.values())


SKIPPED = CorruptLog()


class GuardedLoader:
    """Iterates a loader's batches; damage records become a clear error or skip counts.

    With a ``BatchPool``, a batch's large tensors live in a worker's reused slot: they are
    valid until the next batch is asked for (then the slot goes back to its worker), so a
    consumer that keeps a batch longer keeps a ``clone()``. ``DeviceLoader`` converts each
    batch before asking for the next."""

    def __init__(self, loader, on_corrupt: str, log: CorruptLog = SKIPPED, pool: BatchPool | None = None) -> None:
        self.loader, self.on_corrupt, self.log, self.pool = loader, on_corrupt, log, pool
        self.mapped: dict[tuple[int, int], torch.UntypedStorage] = {}  # slot -> this process's mapping of it

    def __iter__(self):
        held: list = []
        try:
            yield from self._batches(held)
        finally:
            self._release(held)

    def _release(self, held: list) -> None:
        for worker, slot, number in held:
            self.pool.release(worker, slot, number)
        held.clear()

    def _batches(self, held: list):
        yielded, damaged = 0, 0
        for batch in self.loader:
            for worker, slot, number, modality, key in batch.get(SLOTS_KEY, ()):
                held.append((worker, slot, number))
                tensor = batch["inputs"][modality][key]
                if not tensor.is_pinned():  # a pinned batch is the DataLoader's copy, not the slot
                    # Kept mapped: when the slot comes back, torch finds it cached, no new mapping.
                    self.mapped[(worker, slot)] = tensor.untyped_storage()
            batch.pop(SLOTS_KEY, None)
            for record in batch.pop("corrupt", []):
                damaged += 1
                fix = (f"Check the set with `{prog()} verify-shards {remote.parent(record['shard'])}` and "
                       f"re-create it with `{prog()} preprocess` (finished stages are cached)")
                if record.get("fatal"):
                    raise UserError(f"damaged data: {record['reason']} (e.g. {record['shard']}). {fix}")
                if self.on_corrupt != "skip":
                    raise UserError(f"damaged data in shard {record['shard']}, sample {record['key']}: {record['reason']}. "
                                    f"{fix}; data.on_corrupt=skip skips damaged samples (counted in the run's metrics)")
                self.log.add(record)
            if "inputs" in batch:
                yielded += 1
                yield batch
            self._release(held)  # the consumer asked for the next batch: it is done with this one
        if yielded == 0 and damaged:
            raise UserError(f"damaged data: no sample of this part could be read ({damaged} damaged shard(s) or sample(s), "
                            f"listed above); re-create the shards with `{prog()} preprocess`")


class RankShards(torch.utils.data.IterableDataset):
    """Endless shard URLs for one rank and one loader worker, reshuffled on every pass; each
    item names its pass (``{"url", "pass"}``), so that the shuffle never mixes two passes."""

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
        for n in itertools.count():
            rng.shuffle(mine)
            for url in mine:
                yield {"url": url, "pass": n}


def shuffle_by_pass(bufsize: int, initial: int, rng: random.Random):
    """A shuffle buffer (as ``wds.shuffle``: fill ``initial``, then keep ``bufsize`` samples and
    yield a random one per sample read) that empties itself, in random order, before the next
    pass over the shards begins. So an epoch yields every sample of its shards once before any
    sample a second time; with a buffer as large as a worker's share of the part (small corpora),
    an epoch is a random permutation of it, like a map-style loader's ``shuffle=True``. Records
    without a pass (damage records) go straight through."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        buf: list[dict] = []
        current, fill = None, max(1, initial)

        def drain() -> Iterator[dict]:
            rng.shuffle(buf)
            yield from buf
            buf.clear()

        for sample in src:
            this = sample.get("__pass__")
            if this is None:
                yield sample
                continue
            if current is not None and this != current:
                yield from drain()
                fill = max(1, initial)
            current = this
            buf.append(sample)
            if len(buf) < fill:
                continue
            fill = max(1, bufsize)
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
        yield from drain()

    return stage


def _fixed_worker_seed() -> int:
    """Worker index only: with the (seed, rank, epoch) stream seed this makes every worker's
    shard sequence reproducible, independent of torch's global RNG."""
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def worker_shares(n_batches: int, sizes: list[int]) -> list[int]:
    """``n_batches`` split over workers in proportion to the samples each one's shards hold
    (largest remainders, ties to the lower worker); equal shares when no size is known."""
    total = sum(sizes)
    if total <= 0:
        return [-(-(n_batches - w) // len(sizes)) for w in range(len(sizes))]
    exact = [n_batches * size / total for size in sizes]
    shares = [int(x) for x in exact]
    for w in sorted(range(len(sizes)), key=lambda w: (-(exact[w] - shares[w]), w))[:n_batches - sum(shares)]:
        shares[w] += 1
    return shares


def _worker_share(n_batches: int, sizes: list[int] | None = None):
    """This worker's part of an epoch of ``n_batches``, then it stops: the epoch ends in every
    worker, instead of workers running on into batches the epoch never takes (their prefetch,
    thrown away at every epoch's end). With ``sizes`` (samples per worker) the parts follow
    them, so a worker whose shards hold fewer samples is not made to read some twice while
    another leaves some unread (the DataLoader skips a worker that has stopped); else equal."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        shares = worker_shares(n_batches, sizes if sizes and len(sizes) == nworkers else [0] * nworkers)
        yield from itertools.islice(src, shares[wid])

    return stage


def _train_pipeline(epoch: int, urls: list[str], expected: dict[str, int], keys: set[str], exclude: set[str],
                    cfg: DataConfig, rank: int, world_size: int, seed: int, jpeg_on_device: bool,
                    n_batches: int) -> wds.DataPipeline:
    """One epoch's training stream of ``n_batches`` batches, seeded by (seed, rank, epoch);
    built in each worker when the epoch starts, so persistent workers follow ``set_epoch``."""
    stream_seed = (seed * 1_000_003 + rank) * 10_007 + epoch
    sizes = None
    if len(urls) >= world_size:
        source = RankShards(urls, rank, world_size, seed, epoch)
        info = torch.utils.data.get_worker_info()
        nworkers = info.num_workers if info is not None else 1
        sizes = [sum(expected.get(u, 0) for u in source.urls[w::nworkers]) for w in range(nworkers)]
    else:
        source = wds.ResampledShards(urls, seed=stream_seed, worker_seed=_fixed_worker_seed, deterministic=True)
    return wds.DataPipeline(
        source,
        new_pass,
        read_shards(expected, keys),
        _keep(keys, exclude),
        shuffle_by_pass(cfg.shuffle_buffer, min(cfg.shuffle_buffer, 64), random.Random(stream_seed)),
        _guard(to_inputs(cfg, train=True, seed=stream_seed, jpeg_on_device=jpeg_on_device)),
        _batched(cfg.batch_size, partial=False),
        _worker_share(n_batches, sizes),
    )


def _worker_options(cfg: DataConfig, workers: int, plan: LoaderPlan) -> dict:
    """DataLoader options: pinned batches on CUDA; with workers, their prefetch depth and
    whether they live across epochs."""
    options: dict = {"num_workers": workers, "pin_memory": plan.pin_memory}
    if workers > 0:
        options.update(prefetch_factor=cfg.prefetch, persistent_workers=cfg.persistent_workers)
    return options


def _pool(cfg: DataConfig, workers: int) -> BatchPool | None:
    """The shared-memory slots the workers reuse for their batches (none without workers)."""
    return BatchPool(workers, slots_for(cfg.prefetch, workers, len(cfg.modalities))) if workers > 0 else None


def make_loader(shards: str, part: str, cfg: DataConfig, train: bool, rank: int = 0, world_size: int = 1,
                seed: int = 0, epoch: int = 0, device: torch.device | str = "cpu",
                plan: LoaderPlan | None = None) -> tuple[DeviceLoader, int]:
    """A loader over one part and the number of batches it yields per rank per epoch.

    Batches arrive on ``device``, as float32 model inputs (``device_batch.finish``).
    Training streams are seeded by (seed, rank, epoch): ranks read different samples, and
    ``loader.set_epoch(e)`` (or a loader made for epoch e) replays epoch e exactly (resume
    restarts at an epoch). ``plan`` overrides what ``plan_for(cfg, device)`` decides (tests).
    """
    plan = plan or plan_for(cfg, device)
    urls, n_samples = shard_urls(shards, part, cfg.on_corrupt)
    check_sources(shards, cfg)
    index = read_index(shards)
    exclude = {i for ids in excluded_ids(index, part, tuple(cfg.exclude_quality)).values() for i in ids}
    n_samples -= len(exclude)
    if n_samples <= 0:
        raise UserError(f"data.exclude_quality {list(cfg.exclude_quality)} leaves no sample in part {part!r} of {shards}")
    expected = {remote.join(shards, s["name"]): s["samples"] for s in index["parts"][part]["shards"]}
    keys = {"json"} | {SOURCES[s] for s in cfg.modalities.values()}
    keys |= {k for s in cfg.modalities.values() for k in COMPANIONS.get(s, ())}
    workers = min(cfg.workers, len(urls))
    if train:
        per_epoch = cfg.samples_per_epoch or n_samples
        n_batches = max(1, per_epoch // (cfg.batch_size * world_size))
        if len(urls) >= world_size:
            workers = max(1, min(cfg.workers, len(urls) // world_size))  # every worker owns a shard
        pool = _pool(cfg, workers)
        stream = EpochStream(functools.partial(_train_pipeline, urls=urls, expected=expected, keys=keys, exclude=exclude,
                                               cfg=cfg, rank=rank, world_size=world_size, seed=seed,
                                               jpeg_on_device=plan.jpeg_on_device, n_batches=n_batches), epoch)
        stream.batch_pool = pool  # read in the workers by stack() and new_pass
        loader = torch.utils.data.DataLoader(stream, batch_size=None, **_worker_options(cfg, workers, plan))
        return DeviceLoader(GuardedLoader(loader, cfg.on_corrupt, pool=pool), cfg, plan, stream), n_batches
    pool = _pool(cfg, workers)
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        new_pass,
        wds.split_by_node,
        wds.split_by_worker,
        read_shards(expected, keys),
        _keep(keys, exclude),
        _guard(to_inputs(cfg, train=False, jpeg_on_device=plan.jpeg_on_device)),
        _batched(cfg.batch_size, partial=True),
    )
    dataset.batch_pool = pool
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, **_worker_options(cfg, workers, plan))
    return DeviceLoader(GuardedLoader(loader, cfg.on_corrupt, pool=pool), cfg, plan), math.ceil(n_samples / (cfg.batch_size * world_size))
