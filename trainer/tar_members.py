"""Tar members of a shard, read straight off the stream: two reads per member, and the
payloads the model does not read skipped, not copied.

Python's ``tarfile`` in stream mode reads a member through many small buffered reads and
builds a ``TarInfo`` per header; in the training loader that costs about as much as decoding
a spectrogram. Shards are plain POSIX (ustar) archives (``pipelines/pack``, webdataset's
``TarWriter``), so the reader handles ustar headers, GNU long names and pax ``path``
records, and refuses anything else by name. A header whose checksum does not match, or a
stream that ends inside a member, raises ``tarfile.ReadError``, as ``tarfile`` would.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO, Callable, Iterator

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"g")  # links, devices, folders, fifos, pax globals


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or GNU base-256 when the top bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid header: field {field!r} is not a number") from None


def _checked(header: bytes) -> None:
    expected = _number(header[148:156])
    actual = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces
    if actual != expected:
        raise tarfile.ReadError("bad checksum: the stream is not a tar archive here (damaged or cut)")


class _Cursor:
    """Reads and skips on one stream; on a seekable file a skip is a seek, checked against
    the file's size so that a cut-short shard is reported, not read as a shorter one."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        try:
            self.end = fh.seek(0, 2) if fh.seekable() else None
        except (AttributeError, OSError):
            self.end = None
        if self.end is not None:
            fh.seek(0)
            self.pos = 0

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if self.end is not None:
            self.pos += len(data)
        return data

    def exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise tarfile.ReadError(f"unexpected end of data: {n - len(data)} of {n} bytes missing (the shard is cut short)")
        return data

    def skip(self, n: int) -> None:
        if self.end is None:
            while n:
                n -= len(self.exact(min(n, 1 << 20)))
            return
        if self.end - self.pos < n:
            raise tarfile.ReadError(f"unexpected end of data: {n - (self.end - self.pos)} of {n} bytes missing "
                                    "(the shard is cut short)")
        self.pos += n
        self.fh.seek(self.pos)


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of a pax extended header (records "LEN key=value\\n")."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def members(fh: BinaryIO, wanted: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, bytes | None]]:
    """(name, payload) for each regular file in the archive on ``fh``, in order; the payload
    is None for a name ``wanted`` rejects (its bytes are skipped)."""
    cur = _Cursor(fh)
    long_name: str | None = None
    while True:
        header = cur.read(BLOCK)
        if not header or header == bytes(BLOCK):
            return  # end-of-archive marker (or a stream that ends on a member boundary)
        if len(header) != BLOCK:
            raise tarfile.ReadError("unexpected end of data inside a member header (the shard is cut short)")
        _checked(header)
        size, kind = _number(header[124:136]), header[156:157]
        pad = -size % BLOCK
        if kind in (b"L", b"x"):  # the next member's name: GNU long name, pax path
            data = cur.exact(size)
            cur.skip(pad)
            long_name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data) or long_name
            continue
        if kind in SKIPPED:
            cur.skip(size + pad if kind == b"g" else 0)
            long_name = None
            continue
        if kind not in REGULAR:
            raise tarfile.ReadError(f"unsupported tar member type {kind!r} (sparse or vendor-specific)")
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8") + "/" + name
        long_name = None
        if wanted(name):
            data = cur.exact(size)
            cur.skip(pad)
            yield name, data
        else:
            cur.skip(size + pad)
            yield name, None
