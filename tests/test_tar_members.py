"""The loader's tar reader (trainer/tar_members.py) against Python's tarfile: the same
members and bytes for every header format tarfile writes, payloads skipped on files and on
streams, and damage reported as tarfile.ReadError."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from trainer.tar_members import members


class Unseekable(io.RawIOBase):
    """A pipe or HTTP body: read only."""

    def __init__(self, data: bytes) -> None:
        self.inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buf) -> int:
        chunk = self.inner.read(min(len(buf), 1000))  # short reads, as a socket gives
        buf[: len(chunk)] = chunk
        return len(chunk)


def archive(fmt: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """An archive in ``fmt`` with short, long (> 100 and > 155 characters) and non-ASCII
    names, an empty file, a folder and a symlink; and its regular files in order."""
    files = [("a/000.json", b'{"x": 1}'), ("a/000.spec.npy", os.urandom(1300)), ("a/empty.txt", b""),
             ("d" * 60 + "/" + "e" * 70 + ".frames.jpg", os.urandom(513)),
             ("f" * 120 + ".wav.npy", os.urandom(1024)), ("é/ü.cls", b"3")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("a")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in files[:3]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link")
        link.type, link.linkname = tarfile.SYMTYPE, "000.json"
        tar.addfile(link)
        for name, data in files[3:]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), files


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seekable", [True, False])
def test_members_and_bytes_equal_tarfiles(fmt, seekable):
    if fmt == "ustar":  # ustar cannot hold a 124-character name in one piece, nor non-ASCII
        data, files = archive(tarfile.GNU_FORMAT)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, payload in files[:4]:  # the 131-character one uses the ustar prefix field
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        data, files = buf.getvalue(), files[:4]
    else:
        data, files = archive(FORMATS[fmt])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the reference reading
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert expected == files
    fh = io.BytesIO(data) if seekable else io.BufferedReader(Unseekable(data))
    assert list(members(fh)) == files
    fh = io.BytesIO(data) if seekable else io.BufferedReader(Unseekable(data))
    got = list(members(fh, wanted=lambda name: name.endswith(".npy")))
    assert [n for n, _ in got] == [n for n, _ in files]  # every member is seen, in order
    assert [(n, b) for n, b in got if b is not None] == [(n, b) for n, b in files if n.endswith(".npy")]


def test_a_loader_shard_reads_as_tarfile_reads_it(train_shards):
    path = sorted(p for p in os.listdir(train_shards) if p.endswith(".tar"))[0]
    with tarfile.open(os.path.join(train_shards, path)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with open(os.path.join(train_shards, path), "rb") as fh:
        assert list(members(fh)) == expected


@pytest.mark.parametrize("seekable", [True, False])
@pytest.mark.parametrize("cut", ["in_a_header", "in_a_read_payload", "in_a_skipped_payload"])
def test_a_cut_short_archive_raises_read_error(seekable, cut):
    data, files = archive(tarfile.GNU_FORMAT)
    offsets = {"in_a_header": 512 * 3 + 100, "in_a_read_payload": len(data) - 10240 - 700,
               "in_a_skipped_payload": len(data) - 10240 - 700}
    short = data[: offsets[cut]]
    wanted = (lambda name: False) if cut == "in_a_skipped_payload" else (lambda name: True)
    fh = io.BytesIO(short) if seekable else io.BufferedReader(Unseekable(short))
    with pytest.raises(tarfile.ReadError, match="end of data"):
        list(members(fh, wanted))


def test_a_damaged_header_raises_read_error():
    data = bytearray(archive(tarfile.GNU_FORMAT)[0])
    data[512 + 10] ^= 0xFF  # the second header's name: its checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(members(io.BytesIO(bytes(data))))
