"""Damaged data, never a traceback: a sample that does not decode becomes a damage record
(``_guard``, a map stage); records travel down the stream (also out of loader workers) to
``GuardedLoader``, which raises a clear error (``on_corrupt="error"``) or logs and counts
them (``"skip"``) in a ``CorruptLog``.

The log belongs to whoever makes the loaders: a run keeps one for all its loaders and reports
its count (``trainer/loop.py``, ``trainer/evaluate.py``); there is no process-wide log. Only
the warnings are printed once per process (``_warn_once``). Damage found while reading a
shard is ``trainer/shard_reader.py``'s; nothing here reads shards or decodes samples.
"""

from __future__ import annotations

import re
import sys
from typing import Iterator

import torch

from avbalance import remote
from avbalance.errors import UserError
from avbalance.invocation import prog
from trainer.batch_pool import SLOTS_KEY, BatchPool


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


class GuardedLoader:
    """Iterates a loader's batches; damage records become a clear error or skip counts (in
    ``log``: the caller's ``CorruptLog``, shared by every loader of a run).

    With a ``BatchPool``, a batch's large tensors live in a worker's reused slot: they are
    valid until the next batch is asked for (then the slot goes back to its worker), so a
    consumer that keeps a batch longer keeps a ``clone()``. ``DeviceLoader`` converts each
    batch before asking for the next."""

    def __init__(self, loader, on_corrupt: str, log: CorruptLog | None = None, pool: BatchPool | None = None) -> None:
        self.loader, self.on_corrupt, self.pool = loader, on_corrupt, pool
        self.log = CorruptLog() if log is None else log  # the caller's, to read its count; else this loader's own
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
