"""Every kind of bad clip, in one corpus: the run finishes; every clip whose video or audio
decodes is in the shards with its quality flags and measured values; only clips that cannot
give a sample (nothing decodes, or not media) fail, each in status.jsonl with its reason;
every part's coverage (named / written / missing) matches the split list."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct

import numpy as np
import pytest

from manifests.io import read_jsonl
from pipelines.synth.encode import write_flv, write_wav
from pipelines.synth.face import actor_look, render_frames
from pipelines.synth.voice import emotion_voice, synth_voice
from tests.conftest import run_cli


def voice(seconds: float, rng) -> np.ndarray:
    audio = synth_voice("It's eleven o'clock", emotion_voice("HAP", 1.0, 200.0, rng), rng)
    reps = int(np.ceil(seconds * 16000 / len(audio)))
    return np.tile(audio, reps)[: int(seconds * 16000)]


def clip(root: str, name: str, seconds: float, fps: int = 30, face: bool = True, track: bool = True,
         wav: np.ndarray | None | str = "same") -> None:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    audio = voice(seconds, rng)
    n = max(1, int(round(seconds * fps)))
    if face:
        frames = render_frames(actor_look(rng), "HAP", 0.6, n, fps, rng)
    else:
        frames = np.full((n, 360, 480, 3), 90, np.uint8)
        frames[:, 100:200] = 160  # a wall, no face
    write_flv(os.path.join(root, "VideoFlash", name + ".flv"), frames, fps, audio if track else None, 16000)
    if wav is not None:
        write_wav(os.path.join(root, "AudioWAV", name + ".wav"), audio if isinstance(wav, str) else wav, 16000)


def garbage_flv(path: str) -> None:
    """A structurally valid FLV (the header probe passes) whose video packets are noise."""
    rng = np.random.default_rng(0)
    out = bytearray(b"FLV\x01\x01" + struct.pack(">I", 9) + b"\0\0\0\0")
    for i in range(20):
        payload = bytes([0x22]) + rng.bytes(300)  # inter frame, Sorenson H.263, random bits
        out += bytes([9]) + len(payload).to_bytes(3, "big") + (i * 33).to_bytes(3, "big") + b"\0" + b"\0\0\0"
        out += payload + struct.pack(">I", 11 + len(payload))
    open(path, "wb").write(bytes(out))


def make_bad_corpus(root: str) -> None:
    """A synthetic corpus with every kind of bad clip (KEPT and FAILED below say which)."""
    run_cli("synth", "cremad", "--out", root, "--actors", "1", "--sentences", "1", "--seed", "5", check=True)
    # 1001_DFA_* are six good clips. The rest are made here:
    clip(root, "1002_DFA_ANG_XX", 2.5)
    flv = os.path.join(root, "VideoFlash", "1002_DFA_ANG_XX.flv")
    os.truncate(flv, os.path.getsize(flv) * 2 // 3)                      # truncated flv
    clip(root, "1002_DFA_DIS_XX", 2.5, track=False, wav=None)              # no audio at all
    clip(root, "1002_DFA_FEA_XX", 2.5, track=False)                        # no audio stream, WAV present: good
    clip(root, "1002_DFA_HAP_XX", 2.5, wav=np.zeros(40000, np.float32))   # silent audio
    clip(root, "1002_DFA_NEU_XX", 0.3)                                     # under 0.5 s
    clip(root, "1002_DFA_SAD_XX", 12.0)                                    # 5x longer: good
    clip(root, "1003_DFA_ANG_XX", 2.4, fps=25)                             # 25 fps: good
    clip(root, "1003_DFA_DIS_XX", 2.5, face=False)                         # no face anywhere
    clip(root, "1003_DFA_FEA_XX", 2.5)
    garbage_flv(os.path.join(root, "VideoFlash", "1003_DFA_FEA_XX.flv"))   # unreadable video, good WAV
    clip(root, "1003_DFA_HAP_XX", 2.5)
    os.rename(os.path.join(root, "VideoFlash", "1003_DFA_HAP_XX.flv"), os.path.join(root, "VideoFlash", "hello_world.flv"))
    os.remove(os.path.join(root, "AudioWAV", "1003_DFA_HAP_XX.wav"))      # a name outside the scheme
    clip(root, "1003_DFA_NEU_XX", 2.5, wav=None)                           # no WAV: audio from the video
    garbage_flv(os.path.join(root, "VideoFlash", "1003_DFA_SAD_XX.flv"))   # unreadable video, no WAV: nothing
    open(os.path.join(root, "VideoFlash", "1004_DFA_ANG_XX.flv"), "wb").close()  # empty file


BAD_RUN_ARGS = ("--split", "ogm", "--face-fps", "1", "--face-size", "224", "--allow-random-weights", "--workers", "2")


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad") / "corpus")
    make_bad_corpus(root)
    out = str(tmp_path_factory.mktemp("bad") / "out")
    proc = run_cli("preprocess", "cremad", "--root", root, "--out", out, *BAD_RUN_ARGS)
    return proc, root, out


# Kept clips and the quality flags each must carry (none for the good ones).
KEPT = {
    **{f"1001_DFA_{e}_XX": set() for e in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")},
    "1002_DFA_FEA_XX": set(), "1002_DFA_SAD_XX": set(), "1003_DFA_ANG_XX": set(),
    "1002_DFA_ANG_XX": {"truncated_video"},
    "1002_DFA_DIS_XX": {"no_audio"},
    "1002_DFA_HAP_XX": {"silent"},
    "1002_DFA_NEU_XX": {"short"},
    "1003_DFA_DIS_XX": {"no_face"},
    "1003_DFA_FEA_XX": {"no_video", "no_face"},
    "1003_DFA_NEU_XX": {"audio_from_video"},
}
FAILED = {  # nothing decodes, or not media
    "1003_DFA_SAD_XX": "no decodable video frame",
    "1004_DFA_ANG_XX": "empty file",
    "hello_world": "outside the CREMA-D scheme",
}


def read_samples(out: str) -> dict[str, dict]:
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(out, "shards", "ogm", "*.tar")))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}


def test_run_finishes_and_fails_only_clips_without_a_sample(bad_run):
    proc, _, out = bad_run
    assert proc.returncode == 1, proc.stderr  # finished, but some clips failed
    assert f"{len(KEPT)} clips done, {len(FAILED)} failed" in proc.stdout
    assert "Traceback" not in proc.stderr
    status = {s["clip_id"]: s for s in read_jsonl(os.path.join(out, "status.jsonl"))}
    assert {c for c, s in status.items() if s["status"] == "done"} == set(KEPT)
    for clip_id, reason in FAILED.items():
        assert status[clip_id]["status"] == "failed" and reason in status[clip_id]["reason"], status[clip_id]
    for clip_id, flags in KEPT.items():
        assert set(status[clip_id].get("quality", [])) == flags


def test_shards_hold_every_decodable_clip_with_its_flags(bad_run):
    _, _, out = bad_run
    samples = read_samples(out)
    assert set(samples) == set(KEPT)
    for clip_id, flags in KEPT.items():
        assert set(samples[clip_id]["json"]["quality"]) == flags, clip_id
    q = {c: s["json"]["quality"] for c, s in samples.items()}
    # The measured values behind each flag.
    assert q["1002_DFA_HAP_XX"]["silent"]["peak"] < 1e-3
    assert q["1002_DFA_NEU_XX"]["short"]["seconds"] == pytest.approx(0.3, abs=0.01)
    assert len(samples["1002_DFA_NEU_XX"]["wav.npy"]) == pytest.approx(0.3 * 16000, abs=160)  # stored as it is
    cut = q["1002_DFA_ANG_XX"]["truncated_video"]
    assert cut["seconds"] < cut["stated_seconds"] - 0.5 and "truncated FLV" in cut["error"]
    assert 0 < samples["1002_DFA_ANG_XX"]["json"]["frames"]["count"] <= 2  # what precedes the cut
    faceless = samples["1003_DFA_DIS_XX"]
    assert q["1003_DFA_DIS_XX"]["no_face"]["faces_found"] == 0
    assert not faceless["face_mask.npy"].any() and not faceless["face_feats.npy"].any()
    assert faceless["face_feats.npy"].shape[0] == faceless["json"]["frames"]["count"] == 3
    blind = samples["1003_DFA_FEA_XX"]
    assert "no decodable video frame" in q["1003_DFA_FEA_XX"]["no_video"]["reason"]
    assert blind["json"]["frames"]["count"] == 0 and not blind["face_mask.npy"].any()
    assert len(blind["wav.npy"]) == pytest.approx(2.5 * 16000, abs=160)
    mute = samples["1002_DFA_DIS_XX"]
    assert len(mute["wav.npy"]) == 0 and mute["spec.npy"].shape == (128, 188)
    assert "no audio stream" in q["1002_DFA_DIS_XX"]["no_audio"]["reason"]
    assert len(samples["1003_DFA_NEU_XX"]["wav.npy"]) == pytest.approx(2.5 * 16000, abs=1600)  # codec padding
    # The clips that were always good stay as they were.
    long_clip = samples["1002_DFA_SAD_XX"]
    n = long_clip["json"]["frames"]["count"]
    assert n in (12, 13)  # 13 when the last frame's timestamp rounds past 12 s, as with ffmpeg
    assert long_clip["face_feats.npy"].shape[0] == n  # --face-fps 1
    assert samples["1003_DFA_ANG_XX"]["json"]["video"]["fps"] == 25
    assert samples["1002_DFA_FEA_XX"]["json"]["audio"]["seconds"] == pytest.approx(2.5, abs=0.01)


def test_per_part_table_matches_the_split_list(bad_run):
    from manifests.splits import ogm_split

    proc, _, out = bad_run
    index = json.load(open(os.path.join(out, "shards", "ogm", "shards.json")))
    listed = ogm_split()
    samples = read_samples(out)
    for part in ("train", "test"):
        cov = index["coverage"][part]
        named = {c for c, p in listed.items() if p == part}
        written = {c for c in samples if listed.get(c) == part}
        missing = {c for ids in cov["missing"].values() for c in ids}
        assert cov["named"] == len(named) and cov["written"] == len(written) == index["parts"][part]["samples"]
        assert missing == named - written
        # every failed clip the list names is missing with its own reason
        for clip_id in set(FAILED) & named:
            reason = next(r for r, ids in cov["missing"].items() if clip_id in ids)
            assert FAILED[clip_id] in reason
        assert f"{part:6s} {len(named):7d}  {len(written):7d}  {len(named - written):7d}" in proc.stdout
    for part, v in index["parts"].items():  # the per-part flag lists match the samples' own
        for flag, ids in v["quality"].items():
            assert set(ids) == {c for c, f in KEPT.items() if flag in f and listed.get(c) == part}


def test_rerun_is_byte_identical_and_does_no_work(bad_run):
    _, root, out = bad_run
    def digests():
        return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
                for p in sorted(glob.glob(os.path.join(out, "shards", "ogm", "*")))}
    before = digests()
    again = run_cli("preprocess", "cremad", "--root", root, "--out", out, "--split", "ogm", "--face-fps", "1",
                    "--face-size", "224", "--allow-random-weights")
    assert again.returncode == 1 and "0 computed this run" in again.stdout
    assert digests() == before


def test_loader_tiles_short_audio_and_blanks_missing_video(bad_run):
    from trainer.data_config import DataConfig
    from trainer.loader import make_loader

    _, _, out = bad_run
    shards = os.path.join(out, "shards", "ogm")
    cfg = DataConfig(modalities={"audio": "wav", "visual": "frames", "face": "face_feats"}, batch_size=32, workers=0, image_size=32)
    loader, _ = make_loader(shards, "train", cfg, train=False)
    batch = next(iter(loader))
    row = {c: i for i, c in enumerate(batch["clip_id"])}
    audio, frames = batch["inputs"]["audio"], batch["inputs"]["visual"]
    short = audio["x"][row["1002_DFA_NEU_XX"]][audio["mask"][row["1002_DFA_NEU_XX"]]]
    assert len(short) == 16000  # 0.3 s tiled to 1 s, as the reference loaders tile short clips
    n = int(round(0.3 * 16000))
    assert (short[n:2 * n] == short[:n]).all() and short[:n].abs().max() > 0
    assert not frames["mask"][row["1003_DFA_FEA_XX"]].any()  # no_video: no real frame
    assert frames["mask"][row["1001_DFA_ANG_XX"]].any()
    assert not batch["inputs"]["face"]["mask"][row["1003_DFA_DIS_XX"]].any()  # no_face: all-zero mask

    drop = DataConfig(modalities={"audio": "spec", "visual": "frames"}, batch_size=32, workers=0, image_size=32,
                      exclude_quality=("silent", "short", "no_video"))
    loader, _ = make_loader(shards, "train", drop, train=False)
    kept = {c for b in loader for c in b["clip_id"]}
    assert kept == {c for c in KEPT if c in set(batch["clip_id"])} - {"1002_DFA_HAP_XX", "1002_DFA_NEU_XX", "1003_DFA_FEA_XX"}


def test_train_warns_about_an_incomplete_part_and_logs_exclusions(bad_run, tmp_path):
    _, _, out = bad_run
    tiny = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
            "data.batch_size=4", "data.workers=0", "train.epochs=1", "train.patience=0", "data.exclude_quality=[silent,no_video]"]
    proc = run_cli("train", "--shards", os.path.join(out, "shards", "ogm"), "--out", str(tmp_path / "run"),
                   *[a for s in tiny for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr
    index = json.load(open(os.path.join(out, "shards", "ogm", "shards.json")))
    test = index["coverage"]["test"]
    assert f"part 'test' holds {test['written']} of the {test['named']} clips the ogm list names" in proc.stderr
    from manifests.splits import ogm_split

    in_train = [c for c in KEPT if ogm_split().get(c) == "train"]
    silent = [c for c in in_train if "silent" in KEPT[c]]
    blind = [c for c in in_train if "no_video" in KEPT[c]]
    assert silent and blind  # the corpus puts both in the train part
    assert (f"part 'train' drops {len(set(silent) | set(blind))} of {len(in_train)} samples "
            f"(data.exclude_quality: silent {len(silent)}, no_video {len(blind)})") in proc.stderr
