"""Small synthetic trees in the real layouts of UCF-101, Kinetics-Sounds and VGGSound, for
tests and demos: each clip is a texture drifting in a direction set by its class (so optical
flow tells the class) over a class-coloured tint, with a class-pitched tone as its sound."""

from __future__ import annotations

import csv
import os

import numpy as np

from pipelines.synth.encode import write_video

SR = 16000


def clip_frames(label: int, n_classes: int, seconds: float, fps: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """(N, H, W, 3) uint8: a smooth random texture moving 2 px per frame at angle 2*pi*label/C."""
    import cv2

    h, w = size
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * fps)))
    pad = 2 * n + 8
    texture = cv2.GaussianBlur(rng.integers(0, 256, (h + 2 * pad, w + 2 * pad)).astype(np.uint8), (0, 0), 1.5)
    angle = 2 * np.pi * label / n_classes
    dx, dy = 2 * np.cos(angle), 2 * np.sin(angle)
    tint = np.array([0.6 + 0.4 * np.cos(angle), 0.8, 0.6 + 0.4 * np.sin(angle)])
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        x0, y0 = int(round(pad - dx * i)), int(round(pad - dy * i))
        gray = texture[y0:y0 + h, x0:x0 + w].astype(np.float32)
        frames[i] = np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)
    return frames


def clip_audio(label: int, seconds: float, seed: int) -> np.ndarray:
    """A tone at 220 * 2^(label/6) Hz with a little noise, float in [-1, 1] at 16 kHz."""
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.02, len(t))
    return (0.3 * np.sin(2 * np.pi * 220 * 2 ** (label / 6) * t) + noise).astype(np.float32)


UCF_CLASSES = ("ApplyEyeMakeup", "Basketball", "HandstandPushups")  # the last one's files say HandStand


def synth_ucf101(out: str, groups: tuple[int, ...] = (1, 2, 8, 9, 15, 16, 22), seconds: float = 2.0, fps: int = 10,
                 size: tuple[int, int] = (48, 64), seed: int = 0) -> list[str]:
    """``out/UCF-101/<Class>/v_<Class>_gGG_c01.avi`` (MPEG-4 in AVI, no audio, as UCF-101)
    and ``out/ucfTrainTestlist/`` with the official rule: split N tests groups 7N-6..7N.
    Returns the clip stems."""
    stems = []
    lists = os.path.join(out, "ucfTrainTestlist")
    os.makedirs(lists, exist_ok=True)
    with open(os.path.join(lists, "classInd.txt"), "w", encoding="utf-8") as fh:
        fh.writelines(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES))
    rows = []
    for label, cls in enumerate(UCF_CLASSES):
        file_cls = "HandStandPushups" if cls == "HandstandPushups" else cls
        folder = os.path.join(out, "UCF-101", cls)
        os.makedirs(folder, exist_ok=True)
        for g in groups:
            stem = f"v_{file_cls}_g{g:02d}_c01"
            frames = clip_frames(label, len(UCF_CLASSES), seconds, fps, size, seed + 100 * label + g)
            write_video(os.path.join(folder, stem + ".avi"), frames, fps, None, SR)
            rows.append((f"{cls}/{stem}.avi", label + 1, g))
            stems.append(stem)
    for n in (1, 2, 3):
        test = range(7 * n - 6, 7 * n + 1)
        with open(os.path.join(lists, f"trainlist0{n}.txt"), "w", encoding="utf-8") as fh:
            fh.writelines(f"{rel} {label}\r\n" for rel, label, g in rows if g not in test)  # the lists use CRLF
        with open(os.path.join(lists, f"testlist0{n}.txt"), "w", encoding="utf-8") as fh:
            fh.writelines(f"{rel}\r\n" for rel, label, g in rows if g in test)
    return stems


def youtube_id(i: int) -> str:
    """A valid-looking 11-character YouTube id (with a '-' and a '_', as real ones have)."""
    return f"yt-{i:05d}_ab"[:11].ljust(11, "x")


def write_youtube_clip(path: str, label: int, n_classes: int, seconds: float, seed: int, fps: int = 10,
                       size: tuple[int, int] = (48, 64)) -> None:
    """One MP4 (H.264 + AAC) clip."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path, clip_frames(label, n_classes, seconds, fps, size, seed), fps, clip_audio(label, seconds, seed), SR)


def synth_vggsound(out: str, classes: tuple[str, ...] = ("dog barking", "playing piano", "race car, auto racing"),
                   per_class: dict[str, int] | None = None, missing: int = 2, seconds: float = 10.0, seed: int = 0) -> dict:
    """Clips ``out/video/<ytid>_<start:06d>.mp4`` and ``out/vggsound.csv`` listing them plus
    ``missing`` clips per part that were never downloaded. Returns what was written."""
    per_class = per_class or {"train": 3, "test": 2}
    rows, written, gone = [], [], []
    i = 0
    for label, cls in enumerate(classes):
        for part, count in per_class.items():
            for k in range(count + missing):
                ytid, start = youtube_id(i), 10 * (i % 7)
                i += 1
                rows.append((ytid, start, cls, part))
                if k >= count:
                    gone.append((ytid, start, part))
                    continue
                write_youtube_clip(os.path.join(out, "video", f"{ytid}_{start:06d}.mp4"), label, len(classes), seconds, seed + i)
                written.append((ytid, start, part))
    with open(os.path.join(out, "vggsound.csv"), "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return {"rows": rows, "written": written, "missing": gone}


def synth_kinetics_sounds(out: str, classes: tuple[str, ...] = ("playing bagpipes", "tapping pen", "typing"),
                          per_class: dict[str, int] | None = None, missing: int = 1, seconds: float = 10.0,
                          seed: int = 0) -> dict:
    """Clips ``out/<split>/<label>/<ytid>_<start:06d>_<end:06d>.mp4`` (the Kinetics
    downloaders' layout), Kinetics-400 style ``train.csv`` / ``validate.csv`` listing them,
    ``missing`` never-downloaded clips per part, and rows of a non-Kinetics-Sounds class."""
    per_class = per_class or {"train": 3, "val": 2}
    rows, written, gone = [], [], []
    i = 0
    for label, cls in enumerate(classes):
        for part, count in per_class.items():
            for k in range(count + missing):
                ytid, start = youtube_id(i), 5 * (i % 5)
                i += 1
                rows.append({"label": cls, "youtube_id": ytid, "time_start": start, "time_end": start + 10, "split": part})
                if k >= count:
                    gone.append((ytid, start, part))
                    continue
                name = f"{ytid}_{start:06d}_{start + 10:06d}.mp4"
                write_youtube_clip(os.path.join(out, part, cls.replace(" ", "_"), name), label, len(classes), seconds, seed + i)
                written.append((ytid, start, part))
    for part in per_class:  # a Kinetics-400 class outside Kinetics-Sounds: filtered out by the recipe
        rows.append({"label": "riding a bike", "youtube_id": youtube_id(900 + len(rows)), "time_start": 0,
                     "time_end": 10, "split": part})
    for part, name in (("train", "train.csv"), ("val", "validate.csv")):
        with open(os.path.join(out, name), "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writeheader()
            writer.writerows(r for r in rows if r["split"] == part)
    return {"rows": rows, "written": written, "missing": gone}
