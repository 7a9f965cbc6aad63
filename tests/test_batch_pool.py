"""Loader workers reuse shared-memory slots for their batches (trainer/batch_pool.py): a slot
comes back only when the main process is done with its batch, batches are the same as
without the pool, and a pass cut short leaves nothing taken for good."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from trainer.batch_pool import BatchPool, pooled_stack, slots_for
from tests.test_loader import assert_same_batch


def test_slots_are_claimed_released_and_freed_per_pass():
    pool = BatchPool(workers=2, slots=3)
    got = [pool.claim(0, 1000) for _ in range(3)]
    assert [slot for slot, _, _ in got] == [0, 1, 2] and pool.taken() == 3
    assert pool.claim(0, 1000) is None  # all taken: the caller makes a fresh segment
    assert pool.claim(1, 1000)[0] == 0  # the other worker's slots are its own
    pool.release(0, 1, got[1][1])
    slot, number, storage = pool.claim(0, 500)
    assert slot == 1 and storage.data_ptr() == got[1][2].data_ptr()  # the same segment again
    pool.release(0, 1, number)
    slot, number, bigger = pool.claim(0, 4000)
    assert slot == 1 and bigger.nbytes() >= 4000 and bigger.data_ptr() != storage.data_ptr()  # outgrown: remade
    assert bigger.is_shared()
    pool.free_worker(0)  # worker 0 starts a pass: its slots are free, worker 1's stay as they are
    assert pool.taken() == 1
    pool.free_worker(1)
    assert pool.taken() == 0
    assert slots_for(prefetch=2, workers=2) == 5 and slots_for(prefetch=2, workers=2, tensors=2) == 10


def test_a_release_from_an_earlier_pass_is_ignored():
    """A pass's consumer closed only after the next pass began (a kept iterator) must not free
    the slot a batch of the new pass now sits in."""
    pool = BatchPool(workers=1, slots=1)
    pool.free_worker(0)
    slot, old, _ = pool.claim(0, 100)
    pool.free_worker(0)  # the next pass
    slot_again, new, _ = pool.claim(0, 100)
    assert slot_again == slot and new != old
    pool.release(0, slot, old)  # the late release
    assert pool.taken() == 1 and pool.claim(0, 100) is None
    pool.release(0, slot, new)
    assert pool.taken() == 0


def test_tensors_of_different_sizes_keep_slots_of_their_own():
    pool = BatchPool(workers=1, slots=2)
    small, large = 1000, 50_000
    for _ in range(3):  # a batch with a small and a large tensor, then the next batch
        (s1, n1, b1), (s2, n2, b2) = pool.claim(0, small), pool.claim(0, large)
        pool.release(0, s1, n1)
        pool.release(0, s2, n2)
    sizes = sorted(b.nbytes() for b in pool.buffers.values())
    assert sizes == [small, large]  # each fits its tensor: no slot was remade to the largest size


def test_a_lock_that_is_never_released_does_not_hang(monkeypatch):
    """A worker killed while holding the lock: claims fall back, releases give up, in bounded time."""
    import threading

    from trainer import batch_pool

    monkeypatch.setattr(batch_pool, "LOCK_TIMEOUT_S", 0.2)
    pool = BatchPool(workers=1, slots=2)
    slot, number, _ = pool.claim(0, 100)
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:  # another thread owns the lock, as a dead process would
        pool.flags.get_lock().acquire()
        holding.set()
        done.wait()
        pool.flags.get_lock().release()

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait()
    start = time.perf_counter()
    assert pool.claim(0, 100) is None
    pool.release(0, slot, number)  # skipped
    pool.free_worker(0)  # skipped
    assert time.perf_counter() - start < 2.0
    done.set()
    thread.join()
    assert pool.taken() == 1  # the skipped release left the slot taken; the worker's next pass frees it
    out, taken = pooled_stack([torch.zeros(4), torch.ones(4)], pool, 0)
    assert taken is not None and torch.equal(out, torch.stack([torch.zeros(4), torch.ones(4)]))


def test_pooled_stack_equals_stack_and_falls_back_when_no_slot_is_free():
    pool = BatchPool(workers=1, slots=1)
    tensors = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8) for _ in range(4)]
    first, taken = pooled_stack(tensors, pool, 0)
    assert taken[0] == 0 and torch.equal(first, torch.stack(tensors)) and first.untyped_storage().is_shared()
    second, taken = pooled_stack(tensors[::-1], pool, 0)  # slot 0 is still taken
    assert taken is None and torch.equal(second, torch.stack(tensors[::-1])) and second.untyped_storage().is_shared()
    assert torch.equal(first, torch.stack(tensors))  # untouched by the second batch


@pytest.fixture
def shards(train_shards) -> str:
    return train_shards


def config(**kw):
    from trainer.data_config import DataConfig

    base = dict(modalities={"audio": "spec", "visual": "frames"}, batch_size=4, workers=2, image_size=64, frames=3,
                samples_per_epoch=32, prefetch=1)
    return DataConfig(**{**base, **kw})


def test_batches_are_the_same_with_and_without_the_pool(shards, monkeypatch):
    from trainer import loader as loader_module

    def two_epochs() -> list[dict]:
        loader, _ = loader_module.make_loader(shards, "train", config(), train=True, seed=3)
        out = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            out += list(loader)
        return out, loader

    pooled, loader = two_epochs()
    guarded = loader.source
    assert guarded.pool is not None and guarded.pool.taken() == 0  # every slot handed back
    assert 1 <= len(guarded.mapped) <= 2 * slots_for(1, 2, tensors=2)  # slots were used, and reused
    monkeypatch.setattr(loader_module, "_pool", lambda cfg, workers: None)
    plain, loader = two_epochs()
    assert loader.source.pool is None
    assert len(pooled) == len(plain) == 16
    for got, want in zip(pooled, plain):
        assert_same_batch(got, want)


def test_a_batch_stays_intact_until_the_next_is_asked_for(shards):
    """A slow consumer: the workers run ahead while it holds a batch, and must not write into
    that batch's slot (a slot handed back at receipt instead of at the next request would)."""
    from trainer.loader import make_loader

    loader, n = make_loader(shards, "train", config(prefetch=2, samples_per_epoch=48), train=True, seed=5)
    checked = 0
    for batch in loader.source:  # the workers' uint8 batches, as they arrive
        frames = batch["inputs"]["visual"]["x"]
        spec = batch["inputs"]["audio"]["x"]
        before = (frames.clone(), spec.clone())
        time.sleep(0.05)  # the workers fill every free slot meanwhile
        assert torch.equal(frames, before[0]) and torch.equal(spec, before[1])
        checked += 1
    assert checked == n == 12


def test_a_pass_cut_short_leaves_no_slot_taken(shards):
    """PMR and re-learning read part of an epoch; torch drops the batches still queued when the
    next pass starts. The next pass must still get slots and give the batches a fresh loader
    gives."""
    from trainer.loader import make_loader

    loader, _ = make_loader(shards, "train", config(), train=True, seed=4)
    part = list(itertools.islice(iter(loader), 2))
    assert len(part) == 2
    loader.set_epoch(1)
    second = list(loader)
    assert loader.source.pool.taken() == 0
    fresh, _ = make_loader(shards, "train", config(), train=True, seed=4, epoch=1)
    expected = list(fresh)
    assert len(second) == len(expected) == 8
    for got, want in zip(second, expected):
        assert_same_batch(got, want)


def test_an_input_finish_passes_through_is_copied_off_the_slot():
    """On the CPU, ``finish`` returns a float32 input as it is; the batch handed on must not be
    the worker's tensor, whose slot goes back when the next batch is asked for."""
    from trainer.data_config import DataConfig
    from trainer.device_batch import LoaderPlan, _detached, finish

    cfg = DataConfig(modalities={"audio": "spec"})
    raw = {"inputs": {"audio": {"x": torch.rand(4, 1, 8, 8)}}, "label": torch.zeros(4, dtype=torch.long)}
    done = _detached(finish(raw, cfg, LoaderPlan(torch.device("cpu"))), raw)
    x = done["inputs"]["audio"]["x"]
    assert torch.equal(x, raw["inputs"]["audio"]["x"])
    assert x.untyped_storage().data_ptr() != raw["inputs"]["audio"]["x"].untyped_storage().data_ptr()
    half = {"inputs": {"audio": {"x": torch.rand(4, 1, 8, 8).half()}}, "label": torch.zeros(4, dtype=torch.long)}
    converted = finish(half, cfg, LoaderPlan(torch.device("cpu")))["inputs"]["audio"]["x"]
    assert _detached({"inputs": {"audio": {"x": converted}}}, half)["inputs"]["audio"]["x"] is converted  # already its own
