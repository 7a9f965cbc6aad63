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
FAINT = 0.2  # an ambiguous clip carries at most this fraction of the full cue


@dataclass(frozen=True)
class SynthConfig:
    out: str
    actors: int = 6
    sentences: int = 4
    seed: int = 0
    audio_signal: float = 1.0
    video_signal: float = 0.6
    # Share of clips whose voice (face) shows the emotion at full strength; the others show
    # only a faint trace of it (a random 0-FAINT of full), drawn independently per modality,
    # so that a clip can be clear in the voice and ambiguous on the face, or the reverse.
    audio_clear: float = 1.0
    video_clear: float = 1.0
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


def clip_clarity(cfg: SynthConfig, clip_id: str) -> dict[str, float]:
    """How clearly each modality of one clip shows its emotion (1 = fully, else faint).

    Each modality draws from its own random stream, so the two are independent: which
    clips are ambiguous in the voice says nothing about which are ambiguous on the face.
    """
    out = {}
    for modality, clear in (("audio", cfg.audio_clear), ("visual", cfg.video_clear)):
        rng = _rng(cfg.seed, clip_id, "clarity", modality)
        is_clear, faint = rng.random() < clear, rng.uniform(0.0, FAINT)
        out[modality] = 1.0 if is_clear else float(faint)
    return out


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
    clarity = clip_clarity(cfg, clip_id)
    voice = emotion_voice(emotion, cfg.audio_signal * level_k * clarity["audio"], f0, rng)
    audio = synth_voice(SENTENCES[sentence], voice, rng, sr=AUDIO_SR)
    n_frames = max(1, int(round(len(audio) / AUDIO_SR * FPS)))
    frames = render_frames(look, emotion, cfg.video_signal * level_k * clarity["visual"], n_frames, FPS, rng)
    write_wav(wav_path, audio, AUDIO_SR)
    write_flv(video_path, frames, FPS, audio, AUDIO_SR)
    return clip_id


def _settings(cfg: SynthConfig) -> dict:
    """What decides the corpus' content (not where it goes or how many processes write it)."""
    out = asdict(cfg)
    out.pop("out")
    out.pop("workers")
    return out


def check_same_settings(cfg: SynthConfig) -> None:
    """A re-run skips finished clips, so it must not mix clips made with other settings."""
    path = os.path.join(cfg.out, "synth.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        old = json.load(fh).get("config", {})
    new = _settings(cfg)
    # More actors or sentences only add clips; anything else changes the clips already there.
    changed = [f"{k} {old.get(k)} -> {v}" for k, v in new.items() if k not in ("actors", "sentences") and old.get(k) != v]
    if changed:
        raise UserError(f"{cfg.out} holds a synthetic corpus made with other settings ({'; '.join(changed)}); "
                        "choose another --out or delete that folder")


def synth_cremad(cfg: SynthConfig) -> dict:
    """Write the corpus under ``cfg.out``; return a summary (also written as synth.json)."""
    if not 1 <= cfg.actors <= 91:
        raise UserError(f"--actors must be between 1 and 91, not {cfg.actors}")
    if not 1 <= cfg.sentences <= len(SENTENCES):
        raise UserError(f"--sentences must be between 1 and {len(SENTENCES)}, not {cfg.sentences}")
    for name in ("audio_signal", "video_signal"):
        if not 0.0 <= getattr(cfg, name) <= 3.0:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 3, not {getattr(cfg, name)}")
    for name in ("audio_clear", "video_clear"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1 (a share of clips), not {getattr(cfg, name)}")
    if cfg.workers < 1:
        raise UserError(f"--workers must be at least 1, not {cfg.workers}")
    check_same_settings(cfg)
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
    summary = {"config": _settings(cfg), "clips": len(plan), "actors": pick_actors(cfg.actors), "synthetic": True,
               # per clip, how clearly each modality shows the emotion (1 = full cue)
               "clarity": {f"{a}_{s}_{e}_{lv}": clip_clarity(cfg, f"{a}_{s}_{e}_{lv}") for a, s, e, lv in plan}}
    with open(os.path.join(cfg.out, "synth.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return summary
