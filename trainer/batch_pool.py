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
worker frees its own slots when it starts a pass (``free_worker``, in ``new_pass``, a stage of
the loader's pipelines): by then it has sent every batch of the last pass, the main process has
handed back those it used (a pass's consumer is done with it when the next pass starts), and
the rest are dropped unread. The free/taken flags sit behind a lock, whose acquire and
release order the main process's reads of a batch before the worker's next write into its
slot on any CPU.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import torch

SLOTS_KEY = "_pool_slots"  # batch key: [(worker, slot, pass, modality, input key), ...]
FREE, TAKEN = 0, 1
LOCK_TIMEOUT_S = 1.0  # a worker that died holding the lock must not hang the run (see BatchPool)


class BatchPool:
    """Free/taken flags for ``slots`` buffers per worker and each worker's pass number, shared by
    the main process and its loader workers (made before the workers start, in the
    multiprocessing ``context`` the DataLoader uses; they inherit it with the dataset). The
    buffers themselves are made in each worker on first use, sized to what needs them.

    A release names the pass its batch came from and is ignored once the worker has started
    another: a pass's consumer closed late (a kept iterator, a traceback) must not free a
    slot that now holds a batch of the new pass. The lock is taken with a timeout: a worker
    killed while holding it (out of memory, terminated at shutdown) would otherwise hang the
    main process instead of letting torch report the dead worker; on a timeout a worker uses
    a fresh segment and a release is skipped (the slot stays taken until the worker's next pass)."""

    def __init__(self, workers: int, slots: int, context: Any = None) -> None:
        context = context or multiprocessing.get_context()
        self.workers, self.slots = workers, slots
        self.flags = context.Array("b", workers * slots, lock=True)
        self.passes = context.Array("q", workers, lock=self.flags.get_lock())  # guarded by the same lock
        self.buffers: dict[int, torch.UntypedStorage] = {}  # this process's own slots (worker side)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: flags travel, buffers do not
        return {**self.__dict__, "buffers": {}}

    def _locked(self):
        lock = self.flags.get_lock()
        return lock if lock.acquire(timeout=LOCK_TIMEOUT_S) else None

    def claim(self, worker: int, nbytes: int) -> tuple[int, int, torch.UntypedStorage] | None:
        """(slot, pass, buffer): a free slot of ``worker`` holding at least ``nbytes``, now
        taken; None when all are taken. The slot chosen is the smallest free buffer that fits,
        else one not made yet, else the largest free one (remade larger): a batch's tensors of
        different sizes settle in slots of their own size."""
        lock = self._locked()
        if lock is None:
            return None
        try:
            free = [slot for slot in range(self.slots) if self.flags[worker * self.slots + slot] == FREE]
            if not free:
                return None
            sizes = {slot: self.buffers[slot].nbytes() if slot in self.buffers else None for slot in free}
            fitting = [slot for slot in free if sizes[slot] is not None and sizes[slot] >= nbytes]
            unmade = [slot for slot in free if sizes[slot] is None]
            slot = (min(fitting, key=sizes.__getitem__) if fitting else unmade[0] if unmade
                    else max(free, key=sizes.__getitem__))
            self.flags[worker * self.slots + slot] = TAKEN
            number = self.passes[worker]
        finally:
            lock.release()
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.nbytes() < nbytes:
            buffer = self.buffers[slot] = torch.UntypedStorage._new_shared(nbytes)
        return slot, number, buffer

    def release(self, worker: int, slot: int, number: int) -> None:
        """The main process is done with the batch of pass ``number`` in this slot: its worker
        may write it again (unless it has started another pass since; see the class docstring)."""
        lock = self._locked()
        if lock is None:
            return
        try:
            if self.passes[worker] == number:
                self.flags[worker * self.slots + slot] = FREE
        finally:
            lock.release()

    def free_worker(self, worker: int) -> None:
        """Every slot of ``worker`` free, and its pass number moved on: it starts a new pass
        (see the module docstring)."""
        lock = self._locked()
        if lock is None:
            return
        try:
            self.passes[worker] += 1
            for slot in range(self.slots):
                self.flags[worker * self.slots + slot] = FREE
        finally:
            lock.release()

    def taken(self) -> int:
        with self.flags.get_lock():
            return sum(1 for f in self.flags if f == TAKEN)


def worker_pool() -> tuple[BatchPool, int] | None:
    """(the loader's pool, this worker's id) in a loader worker whose dataset carries a pool
    (``make_loader`` sets ``dataset.batch_pool``); None elsewhere."""
    info = torch.utils.data.get_worker_info()
    pool = getattr(info.dataset, "batch_pool", None) if info is not None else None
    return None if pool is None else (pool, info.id)


def new_pass(src):
    """A pipeline stage that frees this worker's slots when its pass starts."""
    found = worker_pool()
    if found is not None:
        pool, worker = found
        pool.free_worker(worker)
    yield from src


def slots_for(prefetch: int, workers: int, tensors: int = 1) -> int:
    """Slots per worker: at most ``prefetch * workers`` batches are asked for at once (a worker
    can hold all of them when the others have finished their share of an epoch), the main
    process holds one more until it asks for the next, and each batch may pool ``tensors``
    tensors (one per modality at most)."""
    return (prefetch * workers + 1) * tensors


def pooled_stack(tensors: list[torch.Tensor], pool: BatchPool | None,
                 worker: int = 0) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """``torch.stack`` into one of ``worker``'s pool slots, or into a fresh shared segment when
    there is no pool or no free slot: (the batch tensor, (slot, pass) or None)."""
    first = tensors[0]
    nbytes = len(tensors) * first.numel() * first.element_size()
    got = pool.claim(worker, nbytes) if pool is not None else None
    if got is None:
        taken, storage = None, torch.UntypedStorage._new_shared(nbytes)
    else:
        slot, number, storage = got
        taken = (slot, number)
    out = first.new_empty(0).set_(storage, 0, (len(tensors), *first.shape))
    return torch.stack(tensors, out=out), taken
