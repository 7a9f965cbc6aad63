"""The process tree, read from ``/proc`` (Linux): for tests and benchmarks that follow the
processes a run starts (Ray's workers and runtime, loader workers)."""

from __future__ import annotations

import os


def children_by_parent() -> dict[int, list[int]]:
    """Parent pid -> the pids of its children, for every process visible now."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while the tree was read
            kids.setdefault(ppid, []).append(int(entry))
    return kids
