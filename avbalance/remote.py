"""Shard sets at URLs: one place that stats, reads and streams a shard set's files, local or not.

A location is a local path, a URL (``http(s)://`` through the standard library; ``s3://``,
``gs://``, ``file://`` and other fsspec protocols through fsspec) or ``pipe:COMMAND`` whose ``{name}`` is replaced by a file name (``shards.json``, a shard)
and whose stdout is the file. Files are streamed, never copied whole before reading; with
``AVBALANCE_SHARD_CACHE=DIR`` (``--shard-cache``) a remote shard read to its end is kept
there and read locally afterwards. Every network wait has a timeout
(``AVBALANCE_REMOTE_TIMEOUT`` seconds, default 60): a server that does not answer is an
error naming the file, not a hang. Environment variables, not arguments, carry both
settings because loader workers and torchrun ranks inherit them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import subprocess
import tempfile
from typing import BinaryIO

from avbalance.errors import UserError

TIMEOUT_ENV = "AVBALANCE_REMOTE_TIMEOUT"
CACHE_ENV = "AVBALANCE_SHARD_CACHE"
DEFAULT_TIMEOUT = 60.0
CHUNK = 1 << 20
DRAIN = 64 << 10  # a tar reader stops within one 10 KB record of the end
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def is_pipe(location: str) -> bool:
    return location.startswith("pipe:")


def is_url(location: str) -> bool:
    """A URL (``scheme://...``), as opposed to a local path or a ``pipe:`` command."""
    return bool(_URL.match(location))


def is_remote(location: str) -> bool:
    """A URL or a ``pipe:`` command, as opposed to a local path."""
    return bool(_URL.match(location)) or is_pipe(location)


def canonical(location: str) -> str:
    """How a run records where its shards are: local paths absolute, URLs as given."""
    if is_pipe(location):
        return location
    return location.rstrip("/") if _URL.match(location) else os.path.abspath(location)


def join(base: str, name: str) -> str:
    """The location of file ``name`` of the shard set at ``base``."""
    if is_pipe(base):
        if "{name}" not in base:
            raise UserError(f"{base}: a pipe: shard set needs {{name}} where the file name goes, "
                            "e.g. 'pipe:aws s3 cp s3://bucket/set/{name} -'")
        return base.replace("{name}", name)
    if _URL.match(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def parent(location: str) -> str:
    """The shard set a shard location belongs to (for messages)."""
    return location if is_pipe(location) else location.rsplit("/", 1)[0]


def timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{TIMEOUT_ENV}={raw!r}: give a positive number of seconds")
    return value


def _http(location: str) -> bool:
    return location.split("://", 1)[0].lower() in ("http", "https")


def _filesystem(url: str):
    """The fsspec filesystem for ``url`` (s3://, gs://, file://, ...), with connect and read
    timeouts where it takes them."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    seconds = timeout()
    options: dict = {}
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = {"connect_timeout": seconds, "read_timeout": seconds}
    elif protocol in ("gs", "gcs"):
        options["timeout"] = seconds
    try:
        return fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as err:
        extra = _EXTRAS.get(protocol)
        hint = f"; install it with `pip install -e '.[{'s3' if extra == 's3fs' else 'gcs'}]'`" if extra else ""
        raise UserError(f"{url}: cannot open {protocol}:// locations ({err}){hint}") from None


def _http_open(location: str, method: str = "GET"):
    """An HTTP response (a stream) with socket timeouts on connect and on every read.

    http(s) goes through the standard library, not fsspec's aiohttp filesystem: that one
    reports a timeout as FileNotFoundError, retries it, and a process whose request timed
    out then hangs at exit (seen with fsspec 2026.9.0 / aiohttp 3.14.5).
    """
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    try:
        return urlopen(Request(location, method=method), timeout=timeout())
    except HTTPError as err:
        if err.code in (404, 410):
            raise FileNotFoundError(f"{location}: not found (HTTP {err.code})") from None
        raise OSError(f"HTTP {err.code} {err.reason}") from None
    except Exception as err:  # noqa: BLE001 - URLError, socket errors, bad URLs
        raise OSError(describe(err)) from None


def describe(err: BaseException) -> str:
    """Why a remote read failed, in words."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__ or getattr(err, "reason", None)
        err = err if isinstance(err, BaseException) else None
    for e in chain:
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
            return f"no answer within {timeout():g} s ({TIMEOUT_ENV})"
        if isinstance(e, ConnectionError):
            return f"cannot connect ({e})"
    root = chain[-1]
    return str(root) if isinstance(root, OSError) and str(root) else f"{type(root).__name__}: {root}"


def size(location: str) -> int | None:
    """The file's size in bytes; None when it does not exist. -1 when it exists but its size
    cannot be known without reading it (``pipe:``, an HTTP server without Content-Length).
    An unreachable location is a UserError naming it."""
    if is_pipe(location):
        return -1
    if not _URL.match(location):
        return os.path.getsize(location) if os.path.isfile(location) else None
    fs = None if _http(location) else _filesystem(location)
    try:
        if fs is None:
            with _http_open(location, "HEAD") as response:
                length = response.headers.get("Content-Length")
            return int(length) if length is not None else -1
        info = fs.info(location)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"cannot reach {location}: {err}") from None
    except Exception as err:  # noqa: BLE001 - object-store clients raise their own types
        raise UserError(f"cannot reach {location}: {describe(err)}") from None
    return int(info["size"]) if info.get("size") is not None else -1


_SIZES: dict[str, int | None] = {}


def sizes(locations: list[str]) -> list[int | None]:
    """``size`` of each location; remote ones asked in parallel and once per process (a
    loader is rebuilt every epoch, and a set does not change during a run)."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [u for u in dict.fromkeys(locations) if is_remote(u) and u not in _SIZES]
    if todo:
        with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
            _SIZES.update(zip(todo, pool.map(size, todo)))
    return [_SIZES[u] if is_remote(u) else size(u) for u in locations]


def read_bytes(location: str) -> bytes | None:
    """The whole (small) file, e.g. ``shards.json``; None when it does not exist."""
    if not is_remote(location):
        if not os.path.isfile(location):
            return None
        with open(location, "rb") as fh:
            return fh.read()
    try:
        with open_stream(location, cache=False) as fh:
            return b"".join(iter(lambda: fh.read(CHUNK), b""))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"cannot read {location}: {err}") from None


_JSON: dict[str, dict] = {}


def read_json(location: str) -> dict | None:
    """A JSON file such as ``shards.json``; None when it does not exist. A remote one is
    fetched once per process (the trainer reads the index many times)."""
    if location in _JSON:
        return _JSON[location]
    data = read_bytes(location)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError as err:
        raise UserError(f"{location} is not valid JSON ({err}): the file is damaged; re-create it") from None
    if is_remote(location):
        _JSON[location] = value
    return value


class _Stream:
    """A readable stream whose failures are OSErrors naming the location (the shard reader
    reports OSErrors as damaged shards), optionally copied into the cache as it is read."""

    def __init__(self, location: str, fh, cache_path: str | None = None) -> None:
        self.location, self.fh, self.cache_path = location, fh, cache_path
        self.copy = None
        if cache_path:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            self.copy = open(f"{cache_path}.{os.getpid()}.tmp", "wb")

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.fh.read(n)
        except Exception as err:  # noqa: BLE001 - socket timeouts, object-store client errors
            raise OSError(describe(err)) from None
        if self.copy is not None:
            if data:
                self.copy.write(data)
            else:
                self._keep()
        return data

    def _keep(self) -> None:
        """The whole file was read: publish the copy (atomically, so readers never see a partial one)."""
        self.copy.close()
        os.replace(self.copy.name, self.cache_path)
        self.copy = None

    def close(self) -> None:
        if self.copy is not None:
            # A tar reader stops at the end-of-archive blocks, just short of EOF: finish small
            # tails so the copy is kept; a stream left half-way is dropped, not cached.
            left = DRAIN
            try:
                while self.copy is not None and left > 0:  # an empty read (EOF) keeps the copy
                    left -= len(self.read(left))
            except OSError:
                pass
            if self.copy is not None:
                self.copy.close()
                os.remove(self.copy.name)
                self.copy = None
        self.fh.close()

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Pipe:
    """``pipe:COMMAND``'s stdout, with a read timeout; a failing command is an OSError
    carrying its exit status and the end of its stderr."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr)
        self.fd = self.proc.stdout.fileno()

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n is None or n < 0 else n
        ready, _, _ = select.select([self.fd], [], [], timeout())
        if not ready:
            self.proc.kill()
            raise OSError(f"`{self.command}` wrote nothing for {timeout():g} s ({TIMEOUT_ENV})")
        data = os.read(self.fd, n)
        if not data:
            code = self.proc.wait()
            if code != 0:
                self.stderr.seek(0)
                tail = self.stderr.read()[-500:].decode("utf-8", "replace").strip()
                raise OSError(f"`{self.command}` exited with status {code}" + (f": {tail}" if tail else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


def cache_path(location: str, cache_dir: str) -> str:
    """Where the cache keeps ``location``: its name, prefixed by a hash of the full location."""
    digest = hashlib.sha1(location.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", location.rsplit("/", 1)[-1])[-80:]
    return os.path.join(cache_dir, f"{digest}-{name}")


def open_stream(location: str, cache: bool = True) -> BinaryIO:
    """A binary stream of the file at ``location``: local files as they are; remote ones
    streamed (from the shard cache when it holds them)."""
    if not is_remote(location):
        return open(location, "rb")
    cache_dir = os.environ.get(CACHE_ENV) if cache else None
    kept = cache_path(location, cache_dir) if cache_dir else None
    if kept and os.path.isfile(kept):
        return open(kept, "rb")
    if is_pipe(location):
        return _Stream(location, _Pipe(location[len("pipe:"):]), kept)  # type: ignore[return-value]
    if _http(location):
        return _Stream(location, _http_open(location), kept)  # type: ignore[return-value]
    fs = _filesystem(location)
    try:
        fh = fs.open(location, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: not found") from None
    except Exception as err:  # noqa: BLE001
        raise OSError(describe(err)) from None
    return _Stream(location, fh, kept)  # type: ignore[return-value]
