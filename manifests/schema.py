"""CREMA-D naming facts and the clip-name parser.

A CREMA-D clip is named ``{actor}_{sentence}_{emotion}_{level}``, e.g. ``1001_DFA_ANG_XX``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ACTORS = tuple(range(1001, 1092))  # 91 actors
SENTENCES: dict[str, str] = {
    # Sentence texts from the CREMA-D README (github.com/CheyneyComputerScience/CREMA-D).
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")  # label index = position here
EMOTION_NAMES = {
    "ANG": "anger", "DIS": "disgust", "FEA": "fear",
    "HAP": "happy", "NEU": "neutral", "SAD": "sad",
}
# Crowd votes in summaryTable.csv use one letter per emotion.
VOTE_LETTERS = {"A": "ANG", "D": "DIS", "F": "FEA", "H": "HAP", "N": "NEU", "S": "SAD"}
LEVELS = ("LO", "MD", "HI", "XX")
MODALITY_DIRS = {"video": ("VideoFlash", ".flv"), "wav": ("AudioWAV", ".wav"), "mp3": ("AudioMP3", ".mp3")}

_NAME = re.compile(r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{2})$")


@dataclass(frozen=True)
class ClipName:
    """The four fields of a CREMA-D clip name."""

    actor: int
    sentence: str
    emotion: str
    level: str

    @property
    def clip_id(self) -> str:
        return f"{self.actor}_{self.sentence}_{self.emotion}_{self.level}"

    @property
    def label(self) -> int:
        return EMOTIONS.index(self.emotion)


def parse_clip_name(stem: str) -> ClipName:
    """Parse a clip stem (no folder, no extension); raise ValueError naming the bad field."""
    m = _NAME.match(stem)
    if not m:
        raise ValueError(f"{stem!r} does not follow actor_sentence_emotion_level (e.g. 1001_DFA_ANG_XX)")
    actor = int(m["actor"])
    if actor not in ACTORS:
        raise ValueError(f"{stem!r}: actor {actor} is outside 1001-1091")
    if m["sentence"] not in SENTENCES:
        raise ValueError(f"{stem!r}: unknown sentence {m['sentence']!r}")
    if m["emotion"] not in EMOTIONS:
        raise ValueError(f"{stem!r}: unknown emotion {m['emotion']!r}")
    if m["level"] not in LEVELS:
        raise ValueError(f"{stem!r}: unknown intensity level {m['level']!r}")
    return ClipName(actor, m["sentence"], m["emotion"], m["level"])
