"""Stream shards into padded batches: webdataset stages that read top to bottom.

    shards -> (resample | split by node and worker) -> shuffle -> decode -> to model inputs
           -> batch with padding and masks

The stages live by job: the index and its checks in ``trainer/shard_index.py``, reading
shards in ``trainer/shard_reader.py``, decoding in ``trainer/sample_decode.py``, batching in
``trainer/batching.py``; this module orders them, splits the shards over ranks and workers
and makes the DataLoader. Damaged data never ends in a traceback: a shard that cannot be
read to its end, or a sample that does not decode, becomes a record naming the shard and
the sample key that travels down the stream (also out of loader workers) to
``GuardedLoader`` (``trainer/corrupt.py``), which raises a clear error
(``on_corrupt="error"``) or logs and counts it (``"skip"``) in the caller's ``CorruptLog``.

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
import itertools
import math
import random
from typing import Iterator

import torch
import webdataset as wds

from avbalance import remote
from avbalance.errors import UserError
from avbalance.shard_format import COMPANIONS, SOURCES
from trainer.batch_pool import BatchPool, new_pass, slots_for
from trainer.batching import _batched
from trainer.corrupt import CorruptLog, GuardedLoader, _guard
from trainer.data_config import DataConfig
from trainer.device_batch import DeviceLoader, EpochStream, LoaderPlan, plan_for
from trainer.sample_decode import to_inputs
from trainer.shard_index import check_sources, excluded_ids, read_index, shard_urls
from trainer.shard_reader import _keep, read_shards


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
                plan: LoaderPlan | None = None, corrupt_log: CorruptLog | None = None) -> tuple[DeviceLoader, int]:
    """A loader over one part and the number of batches it yields per rank per epoch.

    Batches arrive on ``device``, as float32 model inputs (``device_batch.finish``).
    Training streams are seeded by (seed, rank, epoch): ranks read different samples, and
    ``loader.set_epoch(e)`` (or a loader made for epoch e) replays epoch e exactly (resume
    restarts at an epoch). ``plan`` overrides what ``plan_for(cfg, device)`` decides (tests).
    Damaged samples skipped (``on_corrupt="skip"``) are counted in ``corrupt_log``, the
    caller's (a run passes one log to all its loaders); without one, in the loader's own
    (``loader.source.log``).
    """
    plan = plan or plan_for(cfg, device)
    index = read_index(shards)  # read once: the checks and the shard list below all use it
    urls, n_samples = shard_urls(shards, part, cfg.on_corrupt, index)
    check_sources(shards, cfg, index)
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
        return DeviceLoader(GuardedLoader(loader, cfg.on_corrupt, corrupt_log, pool=pool), cfg, plan, stream), n_batches
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
    return DeviceLoader(GuardedLoader(loader, cfg.on_corrupt, corrupt_log, pool=pool), cfg, plan), math.ceil(n_samples / (cfg.batch_size * world_size))
