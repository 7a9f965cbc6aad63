"""Frames: what loader workers do (decode the strip, cut the frames) and what the training
device does (normalise, batched).

Frames stay uint8 until they reach the device: a worker hands over (T, 3, S, S) uint8, a
quarter of the float32 it used to, and normalisation runs once per batch where the model
runs. The random draws (window, crop, flip) come from the worker's generator in the same
order as before, so a seed gives the same batches as the float32 path did.

With ``data.jpeg_decode=cuda`` the worker does not decode at all: it draws the cut and ships
the strip's JPEG bytes; ``decode_and_cut`` decodes the batch on the device (nvJPEG through
``torchvision.io.decode_jpeg``) and cuts there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from trainer.flow_input import flow_values

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CUT_FIELDS = ("count", "stride", "width", "start", "n", "step", "top", "left", "h", "w", "flip")


@dataclass(frozen=True)
class Cut:
    """Which frames of a strip to use and where to crop them: ``count`` frames of ``width``
    pixels every ``stride`` columns; ``n`` of them from ``start``, ``step`` apart; at train
    time one crop box (``top``, ``left``, ``h``, ``w``; h = 0 at evaluation) and a flip for
    the whole clip."""

    count: int
    stride: int
    width: int
    start: int = 0
    n: int = 0
    step: int = 1
    top: int = 0
    left: int = 0
    h: int = 0
    w: int = 0
    flip: bool = False

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([int(getattr(self, f)) for f in CUT_FIELDS], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Cut:
        values = [int(v) for v in t.tolist()]
        return cls(**{f: bool(v) if f == "flip" else v for f, v in zip(CUT_FIELDS, values)})


def decode_strip(data: bytes | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """A ``frames.jpg`` strip as (3, H, W) uint8 (libjpeg-turbo on CPU: the same pixels as
    PIL's decoder, in half its time here; nvJPEG on CUDA)."""
    raw = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:  # libjpeg's reason, without the binding's source location
        raise ValueError(f"not a decodable JPEG: {str(err).rsplit(', ', 1)[-1]}") from None


def strip_layout(meta: dict) -> tuple[int, int, int]:
    """(frame count, stride, frame width) of a sample's strip, from its ``json``."""
    count, stride = meta["frames"]["count"], meta["frames"]["stride"]
    return count, stride, meta.get("video", {}).get("width", stride)


def draw_cut(count: int, stride: int, width: int, height: int, frames: int, crop_scale: tuple[float, float],
             train: bool, rng: random.Random, sampling: str = "consecutive") -> Cut:
    """The frames and crop of one clip, drawn from ``rng`` in a fixed order (none for an empty strip).

    ``consecutive`` (MLB's sampling): ``frames`` consecutive frames, a random window at train
    time, the centred one at evaluation. ``spread`` (OGM-GE's AVE and Kinetics-Sounds
    loaders): frames 0, s, 2s, ... with s = count // frames, at train and evaluation time
    alike. At train time one random resized crop box and flip for the whole clip, so its
    frames stay aligned.
    """
    if count == 0:
        return Cut(0, stride, width)
    n = min(frames, count)
    if sampling == "spread":
        start, step = 0, count // n
    else:
        start, step = (rng.randint(0, count - n) if train else (count - n) // 2), 1
    if not train:
        return Cut(count, stride, width, start, n, step)
    area = height * width * rng.uniform(*crop_scale)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    h = min(height, int(round(math.sqrt(area / aspect))))
    w = min(width, int(round(math.sqrt(area * aspect))))
    top, left = rng.randint(0, height - h), rng.randint(0, width - w)
    return Cut(count, stride, width, start, n, step, top, left, h, w, rng.random() < 0.5)


def strip_frames(strip: torch.Tensor, cut: Cut) -> list[torch.Tensor]:
    """Every frame of a decoded (C, H, W) strip, as views."""
    return [strip[:, :, k * cut.stride:k * cut.stride + cut.width] for k in range(cut.count)]


def cut_frames(frames: torch.Tensor | list[torch.Tensor], cut: Cut, n_out: int, size: int,
               channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_out, C, size, size) uint8 and a (n_out,) mask from a decoded strip or a clip's
    list of (C, H, W) frames (flow slots: ``trainer/flow_input.py``), on any device.

    Train: the crop box resized to size x size, flipped when drawn. Evaluation: the shorter
    side resized to ``size``, centre-cropped. Short clips repeat their last frame, masked out;
    an empty clip gives zeros and an all-False mask (``normalize`` keeps those zeros).
    """
    from torchvision.transforms.v2 import functional as F

    mask = torch.zeros(n_out, dtype=torch.bool)
    if cut.count == 0:
        device = frames.device if isinstance(frames, torch.Tensor) else "cpu"
        return torch.zeros(n_out, channels, size, size, dtype=torch.uint8, device=device), mask
    if isinstance(frames, torch.Tensor):
        frames = strip_frames(frames, cut)
    out = []
    for k in range(cut.start, cut.start + cut.n * cut.step, cut.step):
        frame = frames[k]
        if cut.h:
            frame = F.resized_crop(frame, cut.top, cut.left, cut.h, cut.w, [size, size], antialias=True)
            frame = frame.flip(-1) if cut.flip else frame
        else:
            frame = F.center_crop(F.resize(frame, size, antialias=True), [size, size])
        out.append(frame)
    mask[: len(out)] = True
    out += [out[-1]] * (n_out - len(out))
    return torch.stack(out), mask


_IMAGENET_ON: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std on ``device``, copied there once (a blocking copy per batch
    would make the host wait for the device's stream)."""
    if device not in _IMAGENET_ON:
        _IMAGENET_ON[device] = (IMAGENET_MEAN.to(device), IMAGENET_STD.to(device))
    return _IMAGENET_ON[device]


def _per_clip(flags: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-clip values (B,) viewed to broadcast over ``out`` (B, ...)."""
    return flags.view(*flags.shape, *([1] * (out.dim() - flags.dim())))


def zero_empty_clips(out: torch.Tensor, mask: torch.Tensor, host_check: bool | None = None) -> torch.Tensor:
    """Zero, in place, the clips of ``out`` (B, T, ...) whose ``mask`` (B, T) has no frame.

    ``host_check`` (default: on the CPU) asks first whether any clip is empty and skips the
    pass when none is (the usual case): free on the CPU, but on CUDA a device sync per batch,
    so there the fill runs on the device unconditionally (the same values either way)."""
    empty = ~mask.any(-1)
    if out.device.type == "cpu" if host_check is None else host_check:
        if empty.any():
            out[empty] = 0
        return out
    return out.masked_fill_(_per_clip(empty, out), 0)


def normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 frames (..., T, 3, S, S) -> float32 ImageNet-normalised, on x's device, batched.

    Clips with no frame at all (mask all False) stay zeros, as the float32 path gave them.
    No device sync (``zero_empty_clips``).
    """
    mean, std = _imagenet_stats(x.device)
    # The float32 path's operations in its order (same rounding), in place: one allocation
    # instead of four, which on CPU costs more than the arithmetic.
    out = x.float().div_(255).sub_(mean).div_(std)
    return zero_empty_clips(out, mask)


def flip_flow_x(out: torch.Tensor, flipped: torch.Tensor, host_check: bool | None = None) -> torch.Tensor:
    """Negate, in place, the x channels (even) of the flow slots (B, T, 2k, S, S) of the clips
    ``flipped`` (B,). ``host_check`` as in ``zero_empty_clips``: on CUDA a sign per clip is
    multiplied in on the device instead of indexing with the mask (a sync); -v and v * -1.0
    are the same floats."""
    if out.device.type == "cpu" if host_check is None else host_check:
        if flipped.any():
            out[flipped, :, 0::2] = -out[flipped, :, 0::2]
        return out
    sign = torch.where(flipped.bool(), -1.0, 1.0).to(device=out.device, dtype=out.dtype)
    out[:, :, 0::2].mul_(_per_clip(sign, out))
    return out


def normalize_flow(x: torch.Tensor, mask: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """uint8 flow slots (B, T, 2k, S, S) -> float32 in [-1, 1] around zero motion, batched
    (``flow_input.flow_values``' arithmetic); the x channels (even) of clips whose crop was
    flipped change sign. Clips with no frame stay zeros. No device sync on CUDA."""
    return zero_empty_clips(flip_flow_x(flow_values(x), flipped), mask)


def decode_and_cut(jpegs: list[torch.Tensor], cuts: torch.Tensor, frames: int, size: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.jpeg_decode=cuda``: a batch of strips' JPEG bytes and their cuts (drawn by the
    workers) -> (B, frames, 3, size, size) uint8 and (B, frames) mask on ``device``."""
    decoded = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device) if len(jpegs) else []
    xs, masks = [], []
    for strip, row in zip(decoded, cuts):
        x, m = cut_frames(strip, Cut.from_tensor(row), frames, size)
        xs.append(x)
        masks.append(m)
    return torch.stack(xs), torch.stack(masks).to(device)
