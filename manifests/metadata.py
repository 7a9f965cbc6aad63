"""Load the CREMA-D metadata shipped in ``manifests/cremad/`` (ODbL; see ATTRIBUTION.md).

Demographics per actor, the stimulus number per clip, and the crowd's majority vote per
presentation (voice only, face only, audio-visual) per clip.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

from manifests.schema import VOTE_LETTERS

MODALITY_VOTE_COLUMNS = {"voice": "Voice", "face": "Face", "audiovisual": "MultiModal"}


def data_file(name: str) -> resources.abc.Traversable:
    """A file under manifests/cremad/, found through the package (works when installed)."""
    return resources.files("manifests").joinpath("cremad", name)


def _read_csv(name: str) -> Iterator[dict[str, str]]:
    raw = data_file(name).read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    yield from csv.DictReader(io.StringIO(raw.decode("utf-8")))


@functools.lru_cache(maxsize=1)
def demographics() -> dict[int, dict[str, object]]:
    """Actor id -> {age, sex, race, ethnicity}."""
    out: dict[int, dict[str, object]] = {}
    for row in _read_csv("VideoDemographics.csv"):
        out[int(row["ActorID"])] = {
            "age": int(row["Age"]),
            "sex": row["Sex"],
            "race": row["Race"],
            "ethnicity": row["Ethnicity"],
        }
    return out


@functools.lru_cache(maxsize=1)
def stimulus_numbers() -> dict[str, int]:
    """Clip id -> the stimulus number of SentenceFilenames.csv."""
    return {row["Filename"]: int(row["Stimulus_Number"]) for row in _read_csv("SentenceFilenames.csv")}


@dataclass(frozen=True)
class Vote:
    """The crowd's majority vote for one presentation of one clip.

    ``emotions`` has several entries when the vote was a tie; ``levels`` holds the mean rated
    intensity of each (one per tied emotion). A vote counts as correct only when it is a single emotion equal to the acted
    one: this reproduces CREMA-D's published human accuracies (voice 41.6 %, face 66.3 %,
    audio-visual 72.2 %).
    """

    emotions: tuple[str, ...]
    levels: tuple[float, ...]

    def correct(self, acted: str) -> bool:
        return self.emotions == (acted,)


@functools.lru_cache(maxsize=1)
def crowd_votes() -> dict[str, dict[str, Vote]]:
    """Clip id -> {voice|face|audiovisual: Vote}."""
    out: dict[str, dict[str, Vote]] = {}
    for row in _read_csv("summaryTable.csv"):
        votes = {}
        for modality, col in MODALITY_VOTE_COLUMNS.items():
            letters = row[f"{col}Vote"].split(":")
            levels = row[f"{col}Level"].split(":")
            votes[modality] = Vote(
                tuple(VOTE_LETTERS[x] for x in letters if x in VOTE_LETTERS),
                tuple(float(x) for x in levels if x not in ("", "NA")),
            )
        out[row["FileName"]] = votes
    return out


@dataclass(frozen=True)
class OfficialFile:
    size: int
    sha256: str


@functools.lru_cache(maxsize=1)
def official_media() -> dict[str, OfficialFile]:
    """Relative media path (e.g. ``VideoFlash/1001_DFA_ANG_XX.flv``) -> size and sha256."""
    return {
        row["path"]: OfficialFile(int(row["size"]), row["sha256"])
        for row in _read_csv("media_lfs.csv.gz")
    }


def read_checksum_file(path: str) -> dict[str, OfficialFile]:
    """Read a checksum list in the media_lfs.csv format (path,sha256,size)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: OfficialFile(int(row["size"]), row["sha256"]) for row in csv.DictReader(fh)}
