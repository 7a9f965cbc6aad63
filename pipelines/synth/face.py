"""Synthesised face video: a real photo (scikit-image's astronaut) with an emotion cue.

Each actor gets their own framing, scale, mirror and colour balance; each clip adds a slow
head sway and sensor noise. The emotion shows as a mouth shape and a tint of the face,
fading in over the first 0.4 s, with opacity set by the video signal strength. The cue is
inside the face box, so face crops carry it too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from skimage import data as skdata
from skimage.transform import resize

WIDTH, HEIGHT = 480, 360
# The face in skimage.data.astronaut() (found by MTCNN once): x0, y0, x1, y1 in the 512x512 photo.
PHOTO_FACE = (181.0, 62.0, 268.0, 172.0)

# Emotion -> (tint RGB, mouth half-width and half-height as fractions of the face width,
# mouth vertical offset as a fraction of face height from the face centre, mouth tilt).
EMOTION_FACE: dict[str, tuple[tuple[int, int, int], float, float, float, float]] = {
    "ANG": ((220, 30, 30), 0.22, 0.05, 0.22, 0.0),
    "DIS": ((90, 160, 40), 0.18, 0.06, 0.22, 0.5),
    "FEA": ((230, 230, 250), 0.10, 0.12, 0.24, 0.0),
    "HAP": ((255, 200, 40), 0.28, 0.08, 0.20, 0.0),
    "NEU": ((0, 0, 0), 0.15, 0.02, 0.22, 0.0),
    "SAD": ((40, 80, 220), 0.14, 0.04, 0.25, -0.5),
}


@dataclass(frozen=True)
class ActorLook:
    """Per-actor framing: where the face sits and how the photo is coloured."""

    scale: float
    dx: float
    dy: float
    mirror: bool
    gains: tuple[float, float, float]


def actor_look(rng: np.random.Generator) -> ActorLook:
    return ActorLook(
        scale=float(rng.uniform(0.9, 1.1)),
        dx=float(rng.uniform(-30, 30)),
        dy=float(rng.uniform(-15, 15)),
        mirror=bool(rng.integers(0, 2)),
        # a mild colour cast: strong enough to tell actors apart, too weak to pass for an emotion's tint
        gains=tuple(float(g) for g in rng.uniform(0.9, 1.1, size=3)),
    )


@functools.lru_cache(maxsize=1)
def _photo() -> np.ndarray:
    return skdata.astronaut().astype(np.float32)


@functools.lru_cache(maxsize=32)  # one per actor: every clip of an actor starts from the same frame
def base_frame(look: ActorLook, pad: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The actor's still frame (padded by ``pad`` pixels for sway, read-only) and the face box in it."""
    photo = _photo()
    fx0, fy0, fx1, fy1 = PHOTO_FACE
    cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
    # Crop a 4:3 window around the face; its size sets the face size in the frame.
    win_w = 300.0 / look.scale
    win_h = win_w * HEIGHT / WIDTH
    x0 = int(np.clip(cx - win_w / 2 - look.dx / 1.6, 0, 512 - win_w))
    y0 = int(np.clip(cy - win_h / 2 - look.dy / 1.6, 0, 512 - win_h))
    crop = photo[y0:y0 + int(win_h), x0:x0 + int(win_w)]
    out_w, out_h = WIDTH + 2 * pad, HEIGHT + 2 * pad
    sx, sy = out_w / crop.shape[1], out_h / crop.shape[0]
    frame = resize(crop, (out_h, out_w), order=1, preserve_range=True, anti_aliasing=False)
    frame *= np.asarray(look.gains, np.float32)
    box = ((fx0 - x0) * sx, (fy0 - y0) * sy, (fx1 - x0) * sx, (fy1 - y0) * sy)
    if look.mirror:
        frame = frame[:, ::-1]
        box = (out_w - box[2], box[1], out_w - box[0], box[3])
    frame = np.clip(frame, 0, 255).astype(np.float32)
    frame.setflags(write=False)  # shared between clips through the cache
    return frame, box


def emotion_overlay(emotion: str, box: tuple[float, float, float, float], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The cue as (colour image, alpha mask in [0, 1]) over a frame of ``shape`` (H, W)."""
    tint, half_w, half_h, mouth_y, tilt = EMOTION_FACE[emotion]
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x0, y0, x1, y1 = box
    cx, cy, fw, fh = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    face = ((xx - cx) / (0.5 * fw)) ** 2 + ((yy - cy) / (0.55 * fh)) ** 2 <= 1.0
    colour = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)
    if emotion != "NEU":
        colour[face] = tint
        alpha[face] = 0.35
    my = cy + mouth_y * fh + tilt * (xx - cx) * 0.15
    mouth = ((xx - cx) / (half_w * fw)) ** 2 + ((yy - my) / (half_h * fh)) ** 2 <= 1.0
    colour[mouth] = (90, 10, 20)
    alpha[mouth] = 0.9
    return colour, alpha


def render_frames(
    look: ActorLook,
    emotion: str,
    strength: float,
    n_frames: int,
    fps: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n_frames, 360, 480, 3) uint8 frames of one clip."""
    pad = 12
    base, box = base_frame(look, pad)
    colour, alpha = emotion_overlay(emotion, box, base.shape[:2])
    alpha *= float(np.clip(strength, 0.0, 1.0))
    sway_phase = rng.uniform(0, 2 * np.pi, size=2)
    noise_bank = rng.normal(0, 4.0, size=(4, HEIGHT, WIDTH, 3)).astype(np.float32)
    cue = (colour - base) * alpha[..., None]  # what the full expression adds to the face
    full = base + cue
    frames = np.empty((n_frames, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(n_frames):
        t = i / fps
        ramp = min(1.0, t / 0.4)  # the expression builds up over 0.4 s
        img = full if ramp >= 1.0 else base + ramp * cue
        ox = int(round(pad + 6 * np.sin(2 * np.pi * 0.3 * t + sway_phase[0])))
        oy = int(round(pad + 4 * np.sin(2 * np.pi * 0.2 * t + sway_phase[1])))
        img = img[oy:oy + HEIGHT, ox:ox + WIDTH] + noise_bank[i % 4]
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames
