"""Shared-memory buffers that loader workers reuse for their batches' large tensors.

A batch leaves a loader worker through shared memory. Stacked into a fresh segment each
time, every batch pays for new pages: the worker faults them in (the kernel allocates and
zeroes each one), the main process maps them again, and both unmap them when the batch is
freed: many times the cost of the copy itself (``bench/train.py --decode-only``, key
``handover``), and most of the gap between the shard loader and its decode floor.

Here each worker keeps a few segments (slots) and stacks into a free one. A batch names its
slots (``SLOTS_KEY``: worker, slot, and where the tensor sits in the batch); the main process
hands them back once it is done with the batch, i.e. when the next batch is asked for
(``GuardedLoader``). The main process also keeps its mapping of each slot, so a slot that
comes back is found in torch's cache of shared storages and not mapped again.

Nothing ever waits: a worker with no free slot stacks into a fresh segment, as before. A
pass cut short (PMR and re-learning read part of an epoch) leaves batches the main process
never hands to anyone: torch drops what is still queued when the next pass starts. So each
worker frees its own slots when it starts a pass (``free_worker``, the first stage of the
loader's pipelines): by then it has sent every batch of the last pass, the main process has
handed back those it used (a pass's consumer is done with it when the next pass starts), and
the rest are dropped unread. The free/taken flags sit behind a lock, whose acquire and
release order the main process's reads of a batch before the worker's next write into its
slot on any CPU.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import torch

SLOTS_KEY = "_pool_slots"  # batch key: [(worker, slot, modality, input key), ...]
FREE, TAKEN = 0, 1


class BatchPool:
    """Free/taken flags for ``slots`` buffers per worker, shared by the main process and its
    loader workers (made before the workers start; they inherit it with the dataset). The
    buffers themselves are made in each worker on first use, sized to the first batch that
    needs them (and remade if a larger one comes)."""

    def __init__(self, workers: int, slots: int) -> None:
        self.workers, self.slots = workers, slots
        self.flags = multiprocessing.get_context().Array("b", workers * slots, lock=True)
        self.buffers: dict[int, torch.UntypedStorage] = {}  # this process's own slots (worker side)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: flags travel, buffers do not
        return {**self.__dict__, "buffers": {}}

    def claim(self, worker: int, nbytes: int) -> tuple[int, torch.UntypedStorage] | None:
        """A free slot of ``worker`` holding at least ``nbytes``, now taken; None when all are taken."""
        flags = self.flags
        with flags.get_lock():
            for slot in range(self.slots):
                if flags[worker * self.slots + slot] == FREE:
                    flags[worker * self.slots + slot] = TAKEN
                    break
            else:
                return None
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.nbytes() < nbytes:
            buffer = self.buffers[slot] = torch.UntypedStorage._new_shared(nbytes)
        return slot, buffer

    def release(self, worker: int, slot: int) -> None:
        """The main process is done with the batch in this slot: its worker may write it again."""
        with self.flags.get_lock():
            self.flags[worker * self.slots + slot] = FREE

    def free_worker(self, worker: int) -> None:
        """Every slot of ``worker`` free: it starts a new pass (see the module docstring)."""
        with self.flags.get_lock():
            for slot in range(self.slots):
                self.flags[worker * self.slots + slot] = FREE

    def taken(self) -> int:
        with self.flags.get_lock():
            return sum(1 for f in self.flags if f == TAKEN)


def new_pass(pool: BatchPool | None):
    """A pipeline stage that frees this worker's slots when its pass starts."""
    def stage(src):
        info = torch.utils.data.get_worker_info()
        if pool is not None and info is not None:
            pool.free_worker(info.id)
        yield from src

    return stage


def slots_for(prefetch: int, workers: int) -> int:
    """Slots per worker: at most ``prefetch * workers`` batches are asked for at once (a worker
    can hold all of them when the others have finished their share of an epoch), and the
    main process holds one more until it asks for the next."""
    return prefetch * workers + 1


def pooled_stack(tensors: list[torch.Tensor], pool: BatchPool, worker: int) -> tuple[torch.Tensor, int | None]:
    """``torch.stack`` into one of ``worker``'s pool slots (or a fresh shared segment when none
    is free): (the batch tensor, its slot or None)."""
    first = tensors[0]
    nbytes = len(tensors) * first.numel() * first.element_size()
    got = pool.claim(worker, nbytes)
    slot, storage = (None, torch.UntypedStorage._new_shared(nbytes)) if got is None else got
    out = first.new_empty(0).set_(storage, 0, (len(tensors), *first.shape))
    return torch.stack(tensors, out=out), slot
