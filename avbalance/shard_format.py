"""The shard format, in one place: the index's name and schema version, each sample's member
names, the quality flags, the coverage warnings a reader gives, and reading ``shards.json``
from a folder or a URL.

The writer (``pipelines/stages/pack.py``, ``pipelines/shards.py``), the trainer's reader
(``trainer/shard_index.py``, ``trainer/shard_reader.py``, ``trainer/sample_decode.py``) and the HDF5 export (``pipelines/export_h5.py``) all take these from
here, so the trainer needs nothing from ``pipelines/``. docs/shards.md describes the same
format for readers in other projects.
"""

from __future__ import annotations

from avbalance import remote

SCHEMA_VERSION = 2  # 2: per-sample ``quality`` flags; ``coverage`` and per-part ``quality`` in shards.json
INDEX = "shards.json"  # a shard set's index, written last

# A sample's members: ``<key>.<member>`` in a shard's tar.
META = "json"
FRAMES = "frames.jpg"  # the 1-fps frames side by side, one JPEG strip
FLOW_X, FLOW_Y = "flow_x.jpg", "flow_y.jpg"
FACES = "faces.jpg"  # the face crops side by side (when the pack keeps them)
FACE_MASK, FACE_BOXES, FACE_TIMES = "face_mask.npy", "face_boxes.npy", "face_times.npy"
FACE_FEATS = "face_feats.npy"
WAV, SPEC = "wav.npy", "spec.npy"
JPEG_MEMBERS = (FRAMES, FACES, FLOW_X, FLOW_Y)

# A model input's source (``data.modalities``) -> the member it reads, and the members it
# needs besides.
SOURCES = {"spec": SPEC, "wav": WAV, "frames": FRAMES, "face_feats": FACE_FEATS, "flow": FLOW_X}
COMPANIONS = {"face_feats": (FACE_MASK,), "flow": (FLOW_Y,)}

# Quality flag -> what it means (docs/shards.md lists the same). ``pack`` writes them into each
# sample's JSON (``quality``) and per part into shards.json; the trainer drops flagged samples
# only on request (``data.exclude_quality``).
QUALITY_FLAGS = {
    "no_video": "no video frame decodes: frames are a black placeholder (count 0), faces all-zero",
    "truncated_video": "the video decodes but ends early (error, or shorter than its header says)",
    "no_face": "no face found in any face frame: zero features, all-zero mask",
    "no_audio": "no audio at all (no WAV and no track, or an empty one): empty waveform, silent spectrogram",
    "audio_from_video": "no WAV file: the audio is the video's own track",
    "silent": "the audio's peak level is below the silence threshold",
    "short": "the audio is shorter than the minimum duration (stored as is; loaders tile it)",
}

# The reason shards.json's coverage gives for a clip its split names but the corpus lacks.
NOT_IN_CORPUS = "not in the corpus: no file of this clip under --root"


def read_index(location: str) -> dict | None:
    """The ``shards.json`` of the shard set at ``location`` (a folder, a URL or a ``pipe:``
    command: avbalance.remote); None when there is none."""
    return remote.read_json(remote.join(location, INDEX))


def short_reason(reason: str) -> str:
    """A coverage reason in two or three words (``stage: why`` -> failed at stage), so a table
    stays one line a part; the full reasons are in shards.json and status.jsonl."""
    if reason == NOT_IN_CORPUS:
        return "not in the corpus"
    return f"failed at {reason.split(':')[0]}"


def incomplete_parts(index: dict, parts: list[str]) -> list[str]:
    """A warning line for each of ``parts`` whose shards lack clips its split list names."""
    lines = []
    for part in parts:
        row = (index.get("coverage") or {}).get(part)
        if row and row["written"] < row["named"]:
            reasons = ", ".join(f"{len(ids)} {short_reason(r)}"
                                for r, ids in sorted(row["missing"].items(), key=lambda kv: -len(kv[1])))
            lines.append(f"part {part!r} holds {row['written']} of the {row['named']} clips the {index.get('split')} list names "
                         f"({reasons}); results on it are not comparable with the full split (ids and reasons: coverage in shards.json)")
    return lines
