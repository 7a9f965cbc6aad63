"""Export a WebDataset shard set (``shards/<split>/``) to one HDF5 file.

Layout (``H5_SCHEMA_VERSION`` 1):

Root attributes
    ``schema_version`` (this HDF5 layout's version), ``shards_schema_version``, ``tool``,
    ``corpus``, ``split``, ``source_index`` (the text of ``shards.json``), ``face_weights``
    (JSON text, ``null`` when no face features were computed).

One group per part (``/train``, ``/val``, ``/test``), samples in shard order; attributes
``samples`` (n) and ``shards`` (JSON list of the source tar names). Datasets, each present
only when the shards carry the key it comes from:

    =============== ======================== ======= ====================================
    dataset         shape                    dtype   from shard key
    =============== ======================== ======= ====================================
    clip_id         (n,)                     utf-8   ``__key__``
    label           (n,)                     int64   ``cls``
    meta_json       (n,)                     utf-8   ``json`` (the text, unchanged)
    actor           (n,)                     int64   json ``actor``
    emotion         (n,)                     utf-8   json ``emotion`` (e.g. ``ANG``)
    sentence        (n,)                     utf-8   json ``sentence`` (e.g. ``DFA``)
    level           (n,)                     utf-8   json ``level`` (``XX``/``LO``/``MD``/``HI``)
    frames_jpeg     (n,) vlen                uint8   ``frames.jpg`` (raw JPEG bytes)
    faces_jpeg      (n,) vlen                uint8   ``faces.jpg`` (raw JPEG bytes)
    flow_x_jpeg     (n,) vlen                uint8   ``flow_x.jpg`` (raw JPEG bytes; flow_y_jpeg alike)
    face_feats      (sum_T, 1408)            float16 ``face_feats.npy``
    face_mask       (sum_T,)                 uint8   ``face_mask.npy``
    face_boxes      (sum_T, 4)               float32 ``face_boxes.npy``
    face_times      (sum_T,)                 float32 ``face_times.npy``
    face_offsets    (n+1,)                   int64   sample i is rows [off[i], off[i+1])
    wav             (sum_N,)                 int16   ``wav.npy`` (16 kHz)
    wav_offsets     (n+1,)                   int64   sample i is wav[off[i]:off[i+1]]
    spec            (n, bins, 188)           float16 ``spec.npy``
    =============== ======================== ======= ====================================

The frame layout inside the JPEG strips (``frames.count``, ``frames.stride``, ``video.width``)
is in ``meta_json``. Numeric datasets are chunked and gzip-compressed with the shuffle
filter (portable to any HDF5 reader); JPEG bytes and strings are chunked, not compressed.
``read_h5_sample`` reads one sample back and is the reference reader for this layout.

The file is written to ``OUT.tmp`` and renamed when complete, so a killed export never
leaves a file that looks finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import IO, Callable, Iterator

import h5py
import numpy as np

from avbalance import __version__
from avbalance.errors import UserError
from avbalance import shard_format as F
from avbalance.invocation import prog
from avbalance.progress import progress_bar

H5_SCHEMA_VERSION = 1
PARTS = ("train", "val", "test")
FACE_KEYS = ("face_feats", "face_mask", "face_boxes", "face_times")
# shard key -> dataset name
NPY_KEYS = {member: member.removesuffix(".npy") for member in (F.FACE_FEATS, F.FACE_MASK, F.FACE_BOXES, F.FACE_TIMES, F.WAV, F.SPEC)}
JPEG_KEYS = {member: member.replace(".jpg", "_jpeg") for member in F.JPEG_MEMBERS}
STRING_COLUMNS = ("clip_id", "meta_json", "emotion", "sentence", "level")
CHUNK_BYTES = 256 * 1024  # target chunk size of numeric datasets
OBJECT_CHUNK_ROWS = 256  # chunk rows of vlen (JPEG, string) datasets
FLUSH_EVERY = 64  # samples buffered in memory before they are appended to the file
VLEN_BYTES = h5py.vlen_dtype(np.uint8)
UTF8 = h5py.string_dtype("utf-8")


def export_h5(shards: str, out: str, parts: list[str] | None = None, compression: str | None = "gzip") -> dict:
    """Write the shard set in ``shards`` (a folder with ``shards.json``) to the HDF5 file ``out``.

    ``parts``: the parts to export (default: all parts in the index). Returns
    ``{"out": path, "parts": {part: samples}, "bytes": file size}``.
    """
    index_path = os.path.join(shards, F.INDEX)
    if not os.path.isfile(index_path):
        raise UserError(f"{shards} has no {F.INDEX}: the shard set is incomplete or was never written; "
                        f"run `{prog()} preprocess` to (re)write it, then export again")
    with open(index_path, encoding="utf-8") as fh:
        index_text = fh.read()
    try:
        index = json.loads(index_text)
    except json.JSONDecodeError as err:
        raise UserError(f"{index_path} is not valid JSON ({err}); run `{prog()} preprocess` again") from None
    available = [p for p in PARTS if p in index["parts"]] + [p for p in index["parts"] if p not in PARTS]
    parts = list(dict.fromkeys(parts or available))  # in order, without repeats
    unknown = [p for p in parts if p not in index["parts"]]
    if unknown:
        raise UserError(f"part(s) {', '.join(unknown)} are not in {index_path}; it has {', '.join(available)}")
    for part in parts:
        for shard in index["parts"][part]["shards"]:
            if not os.path.isfile(os.path.join(shards, shard["name"])):
                raise UserError(f"shard {shard['name']} listed in {index_path} is missing; "
                                f"run `{prog()} preprocess` again to rewrite the shard set")

    recipe = json.dumps({"parts": parts, "compression": compression, "tool": f"avbalance {__version__}",
                         "schema_version": H5_SCHEMA_VERSION}, sort_keys=True)
    done = _up_to_date(out, index_text, recipe)
    if done is not None:  # the same shard set, exported the same way: nothing to do
        return {"out": out, "parts": done, "bytes": os.path.getsize(out), "up_to_date": True}
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = out + ".tmp"
    counts: dict[str, int] = {}
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["export"] = recipe  # what a re-run compares (with source_index) to skip the work
            f.attrs["schema_version"] = H5_SCHEMA_VERSION
            f.attrs["shards_schema_version"] = index.get("schema_version", 0)
            f.attrs["tool"] = f"avbalance {__version__}"
            f.attrs["corpus"] = index.get("corpus", "")
            f.attrs["split"] = index.get("split", "")
            f.attrs["source_index"] = index_text
            f.attrs["face_weights"] = json.dumps(index.get("face_weights"), sort_keys=True)
            total = sum(index["parts"][p]["samples"] for p in parts)
            with progress_bar(total, f"export h5 {index.get('split', '')}", unit="clip") as bar:
                for part in parts:
                    counts[part] = _export_part(f.create_group(part), shards, index["parts"][part],
                                                index["keys"], compression, bar.update)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"out": out, "parts": counts, "bytes": os.path.getsize(out)}


def _up_to_date(out: str, index_text: str, recipe: str) -> dict[str, int] | None:
    """The sample counts of ``out`` when it already holds this shard index exported this way
    (files are written whole and renamed, so one that exists is complete); else None."""
    if not os.path.isfile(out):
        return None
    try:
        with h5py.File(out, "r") as f:
            if f.attrs.get("export") != recipe or f.attrs.get("source_index") != index_text:
                return None
            return {name: int(f[name].attrs["samples"]) for name in json.loads(recipe)["parts"]}
    except (OSError, KeyError, ValueError):
        return None  # not a readable export of ours: write it again


def _export_part(group: h5py.Group, shards: str, part: dict, keys: list[str], compression: str | None,
                 advance: Callable[[int], object]) -> int:
    """Append every sample of one part's shards to ``group``; return the sample count."""
    writer = _PartWriter(group, compression)
    for shard in part["shards"]:
        n = 0
        for sample in _read_shard(os.path.join(shards, shard["name"]), shard, keys):
            writer.add(sample)
            advance(1)
            n += 1
        if n != shard["samples"]:
            raise UserError(f"shard {shard['name']} holds {n} samples, shards.json says {shard['samples']}; "
                            f"run `{prog()} preprocess` again to rewrite the shard set")
    n = writer.close()
    group.attrs["samples"] = n
    group.attrs["shards"] = json.dumps([s["name"] for s in part["shards"]])
    return n


class _HashingReader(io.RawIOBase):
    """A read-only file wrapper that hashes what is read (a shard is checked while it streams)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data


def _read_shard(path: str, shard: dict, keys: list[str]) -> Iterator[dict[str, bytes]]:
    """Samples ``{"__key__": clip_id, key: bytes}`` of one tar, in order; the sha256 of the
    file is checked against the index once it has been read."""
    by_length = sorted(keys, key=len, reverse=True)
    name = os.path.basename(path)
    with open(path, "rb") as fh:
        reader = _HashingReader(fh)
        sample: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key = next((k for k in by_length if member.name.endswith("." + k)), None)
                    if key is None:
                        continue  # a key this exporter does not know
                    clip_id = member.name[: -len(key) - 1]
                    if sample and sample["__key__"] != clip_id:
                        yield sample
                        sample = {}
                    sample["__key__"] = clip_id
                    sample[key] = tar.extractfile(member).read()
        except tarfile.TarError as err:
            raise UserError(f"shard {name} is damaged ({err}); run `{prog()} preprocess` again") from None
        while reader.read(1 << 20):
            pass
        if reader.digest.hexdigest() != shard.get("sha256", reader.digest.hexdigest()):
            raise UserError(f"shard {name} does not match its sha256 in shards.json: the shard set is damaged "
                            f"or changed; run `{prog()} preprocess` again to rewrite it")
        if sample:
            yield sample


class _PartWriter:
    """Buffers the samples of one part and appends them to its group in blocks."""

    def __init__(self, group: h5py.Group, compression: str | None) -> None:
        self.group = group
        self.compression = compression
        self.buffers: dict[str, list] = {}
        self.face_lengths: list[int] = []
        self.wav_lengths: list[int] = []
        self.count = 0

    def add(self, sample: dict[str, bytes]) -> None:
        row: dict[str, object] = {"clip_id": sample["__key__"]}
        for key, name in NPY_KEYS.items():
            if key in sample:
                row[name] = np.load(io.BytesIO(sample[key]), allow_pickle=False)
        for key, name in JPEG_KEYS.items():
            if key in sample:
                row[name] = np.frombuffer(sample[key], dtype=np.uint8)
        if "cls" in sample:
            row["label"] = int(sample["cls"].decode("ascii"))
        if "json" in sample:
            text = sample["json"].decode("utf-8")
            meta = json.loads(text)
            row["meta_json"] = text
            row["actor"] = int(meta.get("actor", -1))
            for k in ("emotion", "sentence", "level"):
                row[k] = str(meta.get(k, ""))
        lengths = {len(row[k]) for k in FACE_KEYS if k in row}
        if len(lengths) > 1:
            raise UserError(f"sample {sample['__key__']}: face arrays have different lengths {sorted(lengths)}; "
                            f"the shard set is inconsistent, run `{prog()} preprocess` again")
        if lengths:
            self.face_lengths.append(lengths.pop())
        if "wav" in row:
            self.wav_lengths.append(len(row["wav"]))
        for name, value in row.items():
            self.buffers.setdefault(name, []).append(value)
        self.count += 1
        if self.count % FLUSH_EVERY == 0:
            self.flush()

    def flush(self) -> None:
        for name, values in self.buffers.items():
            if not values:
                continue
            if name in FACE_KEYS or name == "wav":
                data = np.concatenate(values)
            elif name == "spec":
                data = np.stack(values)
            elif name in JPEG_KEYS.values() or name in STRING_COLUMNS:
                data = np.empty(len(values), dtype=object)
                data[:] = values
            else:
                data = np.asarray(values, dtype=np.int64)
            self._append(name, data)
            values.clear()

    def close(self) -> int:
        """Write what is buffered and the offsets datasets; return the sample count."""
        self.flush()
        short = [name for name in self.group if name not in (*FACE_KEYS, "wav") and self.group[name].shape[0] != self.count]
        if short:
            raise UserError(f"{', '.join(short)} missing in some samples; the shard set is inconsistent, "
                            f"run `{prog()} preprocess` again")
        for name, lengths in (("face_offsets", self.face_lengths), ("wav_offsets", self.wav_lengths)):
            if lengths:
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                layout = self._layout(offsets.dtype, offsets.shape)
                layout["chunks"] = (min(layout["chunks"][0], len(offsets)),)
                self.group.create_dataset(name, data=offsets, **layout)
        return self.count

    def _layout(self, dtype: np.dtype, shape: tuple[int, ...]) -> dict:
        """Chunking and filters: ~256 KiB compressed chunks for numbers, plain chunks for vlen data."""
        if dtype.kind == "O":
            return {"chunks": (OBJECT_CHUNK_ROWS,)}
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        chunks = (max(1, CHUNK_BYTES // max(1, row_bytes)), *shape[1:])
        filters = {"compression": self.compression, "shuffle": True} if self.compression else {}
        return {"chunks": chunks, **filters}

    def _append(self, name: str, data: np.ndarray) -> None:
        if name not in self.group:
            dtype = dict.fromkeys(JPEG_KEYS.values(), VLEN_BYTES).get(name, UTF8 if data.dtype.kind == "O" else data.dtype)
            layout = self._layout(np.dtype(dtype), data.shape)
            self.group.create_dataset(name, shape=(0, *data.shape[1:]), maxshape=(None, *data.shape[1:]),
                                      dtype=dtype, **layout)
        ds = self.group[name]
        if ds.shape[1:] != data.shape[1:]:
            raise UserError(f"{name} has shape {data.shape[1:]} per row here and {ds.shape[1:]} in earlier samples; "
                            f"the shard set is inconsistent, run `{prog()} preprocess` again")
        start = ds.shape[0]
        ds.resize(start + len(data), axis=0)
        ds[start:] = data


def read_h5_sample(path: str, part: str, index: int) -> dict:
    """One sample of an exported file, as ``{dataset name: value}``: numpy arrays for the
    numeric data (face arrays and wav cut out with their offsets), ``bytes`` for the JPEGs,
    ``int`` for ``label`` and ``actor``, ``str`` for the string columns."""
    with h5py.File(path, "r") as f:
        group = f[part]
        n = int(group.attrs["samples"])
        if not 0 <= index < n:
            raise IndexError(f"{part} has {n} samples, asked for {index}")
        out: dict = {}
        for name in ("face_offsets", "wav_offsets"):
            if name in group:
                a, b = group[name][index : index + 2]
                for key in (FACE_KEYS if name == "face_offsets" else ("wav",)):
                    if key in group:
                        out[key] = group[key][a:b]
        if "spec" in group:
            out["spec"] = group["spec"][index]
        for name in JPEG_KEYS.values():
            if name in group:
                out[name] = group[name][index].tobytes()
        for name in ("label", "actor"):
            if name in group:
                out[name] = int(group[name][index])
        for name in STRING_COLUMNS:
            if name in group:
                out[name] = group[name].asstr()[index]
        return out
