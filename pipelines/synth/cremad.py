"""``synth_cremad``: write a CREMA-D-shaped corpus, deterministic by seed.

Same folder names, file names, containers and rates as the real corpus
(``VideoFlash/*.flv`` 480x360 ~30 fps with an audio track, ``AudioWAV/*.wav`` 16 kHz mono),
so every tool that reads CREMA-D reads it. Actors are real CREMA-D actor ids (so the
demographics join works), half male and half female.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from avbalance.errors import UserError
from avbalance.progress import progress_bar
from manifests import metadata
from manifests.schema import EMOTIONS, SENTENCES
from pipelines.synth.encode import write_flv, write_wav
from pipelines.synth.face import actor_look, render_frames
from pipelines.synth.voice import emotion_voice, synth_voice

FPS = 30
AUDIO_SR = 16000
# IEO last: it is the one sentence CREMA-D records at several intensity levels.
SENTENCE_ORDER = [s for s in sorted(SENTENCES) if s != "IEO"] + ["IEO"]
LEVEL_STRENGTH = {"LO": 0.6, "MD": 0.8, "HI": 1.0, "XX": 0.9}


@dataclass(frozen=True)
class SynthConfig:
    out: str
    actors: int = 6
    sentences: int = 4
    seed: int = 0
    audio_signal: float = 1.0
    video_signal: float = 0.6
    workers: int = 2


def _rng(seed: int, *keys: object) -> np.random.Generator:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def pick_actors(n: int) -> list[int]:
    """Alternate male and female CREMA-D actor ids, lowest first."""
    demo = metadata.demographics()
    males = [a for a in sorted(demo) if demo[a]["sex"] == "Male"]
    females = [a for a in sorted(demo) if demo[a]["sex"] == "Female"]
    picked = [a for pair in zip(males, females) for a in pair] + males[len(females):]
    return sorted(picked[:n])


def clip_plan(cfg: SynthConfig) -> list[tuple[int, str, str, str]]:
    """(actor, sentence, emotion, level) for every clip, in CREMA-D's recording scheme."""
    plan = []
    for actor in pick_actors(cfg.actors):
        for sentence in SENTENCE_ORDER[: cfg.sentences]:
            for emotion in EMOTIONS:
                levels = ["XX"] if sentence != "IEO" or emotion == "NEU" else ["LO", "MD", "HI"]
                plan.extend((actor, sentence, emotion, level) for level in levels)
    return plan


def _make_clip(args: tuple[SynthConfig, int, str, str, str]) -> str:
    cfg, actor, sentence, emotion, level = args
    clip_id = f"{actor}_{sentence}_{emotion}_{level}"
    video_path = os.path.join(cfg.out, "VideoFlash", clip_id + ".flv")
    wav_path = os.path.join(cfg.out, "AudioWAV", clip_id + ".wav")
    if os.path.exists(video_path) and os.path.exists(wav_path):
        return clip_id  # resumable: a finished clip is never redone
    sex = metadata.demographics()[actor]["sex"]
    actor_rng = _rng(cfg.seed, "actor", actor)
    f0 = actor_rng.uniform(100, 135) if sex == "Male" else actor_rng.uniform(180, 230)
    look = actor_look(actor_rng)
    rng = _rng(cfg.seed, clip_id)
    level_k = LEVEL_STRENGTH[level]
    voice = emotion_voice(emotion, cfg.audio_signal * level_k, f0, rng)
    audio = synth_voice(SENTENCES[sentence], voice, rng, sr=AUDIO_SR)
    n_frames = max(1, int(round(len(audio) / AUDIO_SR * FPS)))
    frames = render_frames(look, emotion, cfg.video_signal * level_k, n_frames, FPS, rng)
    write_wav(wav_path, audio, AUDIO_SR)
    write_flv(video_path, frames, FPS, audio, AUDIO_SR)
    return clip_id


def synth_cremad(cfg: SynthConfig) -> dict:
    """Write the corpus under ``cfg.out``; return a summary (also written as synth.json)."""
    if not 1 <= cfg.actors <= 91:
        raise UserError(f"--actors must be between 1 and 91, not {cfg.actors}")
    if not 1 <= cfg.sentences <= len(SENTENCES):
        raise UserError(f"--sentences must be between 1 and {len(SENTENCES)}, not {cfg.sentences}")
    for name in ("audio_signal", "video_signal"):
        if not 0.0 <= getattr(cfg, name) <= 3.0:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 3")
    os.makedirs(os.path.join(cfg.out, "VideoFlash"), exist_ok=True)
    os.makedirs(os.path.join(cfg.out, "AudioWAV"), exist_ok=True)
    plan = clip_plan(cfg)
    jobs = [(cfg, *p) for p in plan]
    with progress_bar(len(jobs), "synth", unit="clip") as bar:
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers) as pool:
                for _ in pool.map(_make_clip, jobs, chunksize=4):
                    bar.update(1)
        else:
            for job in jobs:
                _make_clip(job)
                bar.update(1)
    summary = {"config": asdict(cfg), "clips": len(plan), "actors": pick_actors(cfg.actors)}
    summary["config"].pop("out")
    summary["config"].pop("workers")
    with open(os.path.join(cfg.out, "synth.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return summary
