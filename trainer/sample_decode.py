"""One sample's raw member bytes -> the model inputs a loader worker hands over
(``to_inputs``, a map stage): ``.npy`` members parsed, frames and flow cut from their JPEG
strips (trainer/transforms.py), waveforms tiled or cropped, face features cropped.

Each input stays in its stored dtype; the float32 conversion happens on the training device
(``trainer/device_batch.py``). Nothing here reads shards, batches samples, or handles a
sample that does not decode (``trainer/corrupt.py`` ``_guard`` wraps ``to_inputs``).
"""

from __future__ import annotations

import io
import json
import math
import random
import re

import numpy as np
import torch
from PIL import Image

from avbalance import shard_format
from trainer.data_config import DataConfig
from trainer.flow_input import split_flow
from trainer.transforms import Cut, cut_frames, decode_strip, draw_cut, strip_frames, strip_layout

MIN_WAV_SECONDS = 1.0  # shorter waveforms are tiled to this length at load time

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
