"""Batches onto the training device, where the float work happens.

Loader workers hand over inputs in their stored dtypes (frames and flow uint8, spectrogram and face
features float16, waveform int16; trainer/sample_decode.py). ``finish`` copies a batch to the device
and converts it there, batched, to the float32 inputs the model reads: the same values the
workers used to compute, at a quarter (frames) or half (the rest) of the bytes crossing
the worker -> main process boundary and the host -> device link.

On CUDA: batches are pinned by the DataLoader and copied with ``non_blocking``, and
``DeviceLoader`` copies and converts the next batch on a side stream while the current one
trains; with ``data.jpeg_decode=cuda`` the strips are decoded there too (nvJPEG, batched).
Without CUDA every path falls back to the CPU: nothing here needs a GPU to run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from trainer.transforms import decode_and_cut, normalize, normalize_flow

if TYPE_CHECKING:
    from trainer.data_config import DataConfig

_WARNED: set[str] = set()


@dataclass(frozen=True)
class LoaderPlan:
    """Where batches go and what runs where."""

    device: torch.device
    pin_memory: bool = False  # page-locked host batches, non-blocking copies (CUDA only)
    jpeg_on_device: bool = False  # workers ship JPEG bytes; the device decodes and cuts


def plan_for(cfg: DataConfig, device: torch.device | str) -> LoaderPlan:
    """The plan for ``device``: CUDA features only where CUDA is really there; a CUDA-only
    option on another device falls back to the CPU path with one warning."""
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cfg.jpeg_decode == "cuda" and not cuda and "jpeg" not in _WARNED:
        _WARNED.add("jpeg")
        print(f"warning: data.jpeg_decode=cuda needs a CUDA training device (this run trains on {device.type}"
              f"{'' if torch.cuda.is_available() else ', and no CUDA device is visible'}); the loader workers decode "
              "the frames instead", file=sys.stderr, flush=True)
    return LoaderPlan(device, pin_memory=cuda and cfg.pin_memory, jpeg_on_device=cuda and cfg.jpeg_decode == "cuda")


def finish(batch: dict, cfg: DataConfig, plan: LoaderPlan) -> dict:
    """A worker's batch on ``plan.device`` as model inputs: frames normalised, the rest float32."""
    device, non_blocking = plan.device, plan.pin_memory
    inputs: dict[str, dict[str, torch.Tensor]] = {}
    for modality, parts in batch["inputs"].items():
        source = cfg.modalities[modality]
        if "jpeg" in parts:
            x, mask = decode_and_cut(parts["jpeg"], parts["cut"], cfg.frames, cfg.image_size, device)
            inputs[modality] = {"x": normalize(x, mask), "mask": mask}
            continue
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in parts.items()}
        x = moved["x"]
        if source == "frames":
            x = normalize(x, moved["mask"])
        elif source == "flow":
            x = normalize_flow(x, moved["mask"], moved.pop("flip"))
        elif source == "wav":
            x = x.float() / 32768.0  # int16 -> [-1, 1): exact in float32
        else:
            x = x.float()
        inputs[modality] = {**moved, "x": x}
    return {**batch, "inputs": inputs, "label": batch["label"].to(device, non_blocking=non_blocking)}


class EpochStream(torch.utils.data.IterableDataset):
    """A stream rebuilt for the current epoch at each pass, in each worker.

    The epoch sits in shared memory, so workers that live across epochs
    (``persistent_workers``) see ``set_epoch`` and replay exactly the stream a fresh loader
    for that epoch would give.
    """

    def __init__(self, build: Callable[[int], Iterable], epoch: int = 0) -> None:
        super().__init__()
        self.build = build
        self.epoch = torch.tensor([epoch], dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __iter__(self) -> Iterator:
        return iter(self.build(int(self.epoch.item())))


def keep_global_rng_in_step(source: Iterable) -> None:
    """A pass over a DataLoader whose workers live on draws nothing from torch's global
    generator, while a fresh DataLoader iterator draws its workers' base seed from it. Make
    the same draw here, so that a run's later random numbers (dropout, a method's noise, its
    sampling) are those it got when every pass made a fresh iterator: the same seed gives
    the same run as before the workers were kept."""
    loader = getattr(source, "loader", source)  # GuardedLoader wraps the DataLoader
    if isinstance(loader, torch.utils.data.DataLoader) and loader.persistent_workers and loader._iterator is not None:
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)


class DeviceLoader:
    """Iterates a loader's worker batches as finished batches on the device (``finish``).

    On CUDA one batch is prepared ahead on a side stream, so its copy and conversion overlap
    the step that trains on the previous one.
    """

    def __init__(self, source: Iterable[dict], cfg: DataConfig, plan: LoaderPlan, stream: EpochStream | None = None) -> None:
        self.source, self.cfg, self.plan, self.stream = source, cfg, plan, stream

    def set_epoch(self, epoch: int) -> None:
        """Training: the next pass reads epoch ``epoch``'s stream (the workers stay up)."""
        if self.stream is None:
            raise ValueError("set_epoch is for training loaders; evaluation streams do not depend on the epoch")
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        keep_global_rng_in_step(self.source)
        if self.plan.device.type != "cuda":
            for batch in self.source:
                yield _detached(finish(batch, self.cfg, self.plan), batch)
            return
        yield from self._ahead()

    def _ahead(self) -> Iterator[dict]:
        side = torch.cuda.Stream(self.plan.device)
        main = torch.cuda.current_stream(self.plan.device)
        pending: tuple[dict, torch.cuda.Event] | None = None
        for batch in self.source:
            with torch.cuda.stream(side):
                ready = finish(batch, self.cfg, self.plan)  # queued behind nothing the step does
                done = torch.cuda.Event()
                done.record(side)
            if pending is not None:
                yield _hand_over(*pending, main)
            pending = (ready, done)
        if pending is not None:
            yield _hand_over(*pending, main)


def _detached(done: dict, raw: dict) -> dict:
    """``done`` with a copy of any input that is still the worker's tensor (a float32 input
    ``finish`` passes through on the CPU): the worker's large tensors sit in a pool slot that
    goes back to it when the next batch is asked for (``trainer/batch_pool.py``)."""
    shared = {t.untyped_storage().data_ptr() for parts in raw["inputs"].values() for t in parts.values()
              if isinstance(t, torch.Tensor)}
    for parts in done["inputs"].values():
        for key, t in parts.items():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in shared:
                parts[key] = t.clone()
    return done


def _hand_over(batch: dict, done: torch.cuda.Event, main: torch.cuda.Stream) -> dict:
    """``batch`` for the training stream: it waits for the batch's copy, and the caching
    allocator learns that tensors made on the side stream are used on it."""
    main.wait_event(done)
    for parts in batch["inputs"].values():
        for t in parts.values():
            t.record_stream(main)
    batch["label"].record_stream(main)
    return batch
