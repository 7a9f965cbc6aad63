"""One writer per run folder: a lock that a killed process cannot leave stuck.

A process that trains into a run folder holds ``fcntl.flock(LOCK_EX)`` on ``<run folder>/.lock``
for as long as it writes there, and records in that file who it is (pid, host name, start time
in UTC, command line). The kernel drops an flock when the last descriptor of the holder's open
file closes, which a process's death does, SIGKILL and a crash included: there is no stale lock
to clean up, and a lock that is held belongs to a live process. The ``.lock`` file itself is left
in place when the lock is released (deleting it would let two processes lock two different
files of the same name).

``hold_run_folder(folder)`` takes the lock or refuses with the holder named (a ``UserError``);
``holder(folder)`` tells, without taking anything or creating any file, who holds it now. A
sweep skips the runs whose folder is held (experiments/sweep.py).

Under DDP (torchrun) only one process should lock, the main rank: the caller decides (the
trainer takes it on rank 0 where the run folder starts to change); the other ranks write
nothing there.

Where it works: on a local file system, and across nodes on file systems whose flock is a
cluster lock: NFSv4 (the Linux client maps flock to NFS byte-range locks), Lustre mounted with
``-o flock``, GPFS/Spectrum Scale, BeeGFS with global locks. Elsewhere (Lustre with
``localflock``, NFSv3 without lockd, some FUSE file systems) it is a lock among the processes
of one machine only. A file system that refuses locks altogether (``ENOLCK``, ``ENOSYS``,
``EOPNOTSUPP``) gets one warning and no lock rather than no training.

A forked child (e.g. a data-loader worker started with ``fork``) would share the lock's open
file and keep it held after the holder's death; the descriptor is closed in every forked child
(``os.register_at_fork``), so the lock lives exactly as long as the process that took it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from avbalance.errors import UserError

LOCK_NAME = ".lock"
# errno values of a file system that does not do locks at all (not "someone holds it").
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_HELD: dict[str, tuple[int, dict[str, Any]]] = {}  # realpath of the lock file -> (fd, details), this process
_HELD_GUARD = threading.Lock()


def lock_path(folder: str) -> str:
    """The lock file of a run folder."""
    return os.path.join(folder, LOCK_NAME)


def _close_in_child() -> None:
    """After a fork, in the child: drop the inherited descriptors so the lock dies with its taker."""
    global _HELD_GUARD
    _HELD_GUARD = threading.Lock()  # another thread may have held it at the fork
    for fd, _ in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def _details() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": _command_line()}


def holder_text(details: dict[str, Any] | None) -> str:
    """``pid 123 on host h, since 2026-12-05T16:01:02Z: python cli.py train ...`` (what is known;
    the command on one line, cut at 300 characters)."""
    d = details or {}
    command = " ".join(str(d.get("command") or "").split())  # one line, however it was quoted
    if len(command) > 300:
        command = command[:297] + "..."
    who = f"pid {d.get('pid', '?')} on host {d.get('host', '?')}, since {d.get('since', '?')}"
    return who + (f": {command}" if command else "")


def describe(folder: str, details: dict[str, Any] | None) -> str:
    """``runs/x is being trained by another process (pid 123 on host h, since ...: CMD)``."""
    return f"{folder} is being trained by another process ({holder_text(details)})"


def _read_details(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        data = json.loads(raw.decode("utf-8", errors="replace") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # written by the holder a moment after it took the lock: not there yet


def _warn_no_locks(folder: str, err: OSError) -> None:
    print(f"warning: {folder}: this file system refuses file locks ({os.strerror(err.errno or 0)}); "
          "nothing stops a second process from training into this run folder at the same time", file=sys.stderr, flush=True)


def _lock_exclusive(fd: int, tries: int = 10) -> None:
    """``LOCK_EX | LOCK_NB``, tried again for a moment: ``holder()`` elsewhere takes a shared
    lock for microseconds to look, which must not read as a holder. BlockingIOError when held."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(0.02)


@contextmanager
def hold_run_folder(folder: str) -> Iterator[dict[str, Any]]:
    """Hold ``folder``'s lock for the ``with`` block (the folder is created if missing), or
    raise ``UserError`` naming the process that holds it. Yields what was recorded in the
    lock file (pid, host, since, command). Released on exit; the ``.lock`` file stays."""
    os.makedirs(folder, exist_ok=True)
    path = lock_path(folder)
    key = os.path.realpath(path)
    with _HELD_GUARD:
        if key in _HELD:
            raise UserError(f"{folder} is already held by this process (pid {os.getpid()}): one writer per run folder")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: the holder's record is in it
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            details = _read_details(fd)
            os.close(fd)
            raise UserError(f"{describe(folder, details)}; wait for it to finish, or stop it") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKS:
                raise
            _warn_no_locks(folder, err)
            yield {}
            return
        # The file may have been deleted (and recreated) between open and flock: then the
        # lock is on a name nobody else will open; lock the file that is there now.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    details = _details()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(details) + "\n").encode("utf-8"), 0)
        os.fsync(fd)  # other nodes of a shared file system read it from the server
    except OSError:
        os.close(fd)
        raise
    with _HELD_GUARD:
        _HELD[key] = (fd, details)
    try:
        yield details
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        try:
            os.ftruncate(fd, 0)  # no record of a holder that is gone (a killed one's stays till the next)
        except OSError:
            pass
        os.close(fd)  # releases the lock


def holder(folder: str) -> dict[str, Any] | None:
    """Who holds ``folder``'s lock now: its recorded details (``pid``, ``host``, ``since``,
    ``command``; an empty dict in the moment between its lock and its record), or None when
    there is no lock file or nobody holds it. Takes nothing that outlives the call and creates
    no file."""
    path = lock_path(folder)
    key = os.path.realpath(path)
    with _HELD_GUARD:
        if key in _HELD:  # this process: answered without opening the file (closing another
            return dict(_HELD[key][1])  # descriptor would drop our own lock where flock is an fcntl lock, NFS)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            details = _read_details(fd)
            if not details:  # the holder is between its lock and its record: give it a moment
                for _ in range(20):
                    time.sleep(0.01)
                    details = _read_details(fd)
                    if details:
                        break
            return details
        except OSError as err:
            if err.errno in _NO_LOCKS:
                return None  # no locks on this file system: nobody can be seen holding one
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
