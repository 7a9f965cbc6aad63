"""Small synthetic corpora in the real layouts of the ``folder`` and ``ave`` recipes, for the
tests and the benchmark: each class has its own colour and tone, so a model can learn it,
and a clip may change content at a known time (to check that windows keep frames and audio
aligned)."""

from __future__ import annotations

import csv
import os

import numpy as np

from pipelines.synth.encode import write_video, write_wav

SR = 16000


def clip_arrays(label: int, seconds: float, fps: int = 10, size: tuple[int, int] = (64, 48),
                change_at: float | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N, H, W, 3) and a mono track for one clip of class ``label``: a flat colour and a
    tone of the class, with a little noise. With ``change_at``, frames are black and the audio
    silent before that time, and the class content starts there."""
    rng = np.random.default_rng(seed)
    w, h = size
    n = int(round(seconds * fps))
    # a distinct colour per class, never dark (60..239 per channel): black means "before the change"
    hue = 60 + (label * np.array([97, 53, 151]) + np.array([0, 80, 40])) % 180
    hue = hue.astype(np.int16)
    frames = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):  # frame by frame: a 10 s 480x360 clip's noise would not fit in float64 at once
        frames[k] = np.clip(hue + rng.integers(-12, 13, (h, w, 3), dtype=np.int16), 0, 255)
    t = np.arange(int(round(seconds * SR))) / SR
    audio = 0.4 * np.sin(2 * np.pi * (300 + 120 * label) * t) + rng.normal(0, 0.01, len(t))
    if change_at is not None:
        frames[: int(round(change_at * fps))] = 0
        audio[: int(round(change_at * SR))] = 0.0
    return frames, audio.astype(np.float32)


def write_folder_corpus(root: str, classes: int = 3, per_class: int = 6, seconds: float = 2.0, ext: str = ".mp4",
                        speakers: int = 4, sidecar_every: int = 0, seed: int = 0, fps: int = 10,
                        size: tuple[int, int] = (64, 48)) -> str:
    """``root/<class>/<class>_<i>.mp4`` plus ``root/labels.csv`` (path,label,speaker); every
    ``sidecar_every``-th clip also gets a WAV beside it. Returns the CSV's path."""
    rows = []
    for c in range(classes):
        name = f"class{c}"
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            rel = f"{name}/{name}_{i}{ext}"
            frames, audio = clip_arrays(c, seconds, fps=fps, size=size, seed=seed * 1000 + c * 100 + i)
            write_video(os.path.join(root, rel), frames, fps, audio, SR)
            if sidecar_every and i % sidecar_every == 0:
                write_wav(os.path.join(root, os.path.splitext(rel)[0] + ".wav"), audio, SR)
            rows.append({"path": rel, "label": name, "speaker": f"spk{(c + i) % speakers}"})
    path = os.path.join(root, "labels.csv")
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "speaker"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_ave_corpus(root: str, classes: list[str], per_class: int = 4, seconds: float = 10.0, seed: int = 0) -> str:
    """AVE as distributed: ``root/AVE/<youtube id>.mp4`` (H.264 + AAC, 10 s), ``Annotations.txt``
    with a ``Category&VideoID&Quality&StartTime&EndTime`` header, and ``trainSet.txt``,
    ``valSet.txt``, ``testSet.txt`` in the same format without a header. Each event's content
    starts at its start time. Returns ``root``."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "AVE"), exist_ok=True)
    lines = {"train": [], "val": [], "test": []}
    for c, category in enumerate(classes):
        for i in range(per_class):
            vid = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), 11))
            start = int(rng.integers(0, 4))
            end = int(rng.integers(start + 3, 11))
            frames, audio = clip_arrays(c, seconds, change_at=start, seed=seed * 1000 + c * 100 + i)
            write_video(os.path.join(root, "AVE", f"{vid}.mp4"), frames, 10, audio, SR)
            part = "test" if i == 0 else "val" if i == 1 else "train"
            lines[part].append(f"{category}&{vid}&good&{start}&{end}")
    everything = [ln for part in ("train", "val", "test") for ln in lines[part]]
    with open(os.path.join(root, "Annotations.txt"), "w") as fh:
        fh.write("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(everything) + "\n")
    for part, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        with open(os.path.join(root, name), "w") as fh:
            fh.write("\n".join(lines[part]) + "\n")
    return root
