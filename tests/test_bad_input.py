"""Every kind of bad clip the issue names, in one corpus: the run finishes, the shards hold
every good clip, every bad clip is in status.jsonl with its reason, the exit code says so."""

from __future__ import annotations

import glob
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


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad") / "corpus")
    run_cli("synth", "cremad", "--out", root, "--actors", "1", "--sentences", "1", "--seed", "5", check=True)
    # 1001_DFA_* are six good clips. The rest are made here:
    clip(root, "1002_DFA_ANG_XX", 2.5)
    flv = os.path.join(root, "VideoFlash", "1002_DFA_ANG_XX.flv")
    os.truncate(flv, os.path.getsize(flv) * 2 // 3)                      # truncated flv
    clip(root, "1002_DFA_DIS_XX", 2.5, track=False, wav=None)              # no audio at all
    clip(root, "1002_DFA_FEA_XX", 2.5, track=False)                        # no audio stream, WAV present: good
    clip(root, "1002_DFA_HAP_XX", 2.5, wav=np.zeros(40000, np.float32))   # silent audio
    clip(root, "1002_DFA_NEU_XX", 0.3)                                     # under 0.5 s
    clip(root, "1002_DFA_SAD_XX", 50.0)                                    # 20x longer: good
    clip(root, "1003_DFA_ANG_XX", 2.4, fps=25)                             # 25 fps: good
    clip(root, "1003_DFA_DIS_XX", 2.5, face=False)                         # no face anywhere
    clip(root, "1003_DFA_FEA_XX", 2.5)
    garbage_flv(os.path.join(root, "VideoFlash", "1003_DFA_FEA_XX.flv"))   # unreadable video
    clip(root, "1003_DFA_HAP_XX", 2.5)
    os.rename(os.path.join(root, "VideoFlash", "1003_DFA_HAP_XX.flv"), os.path.join(root, "VideoFlash", "hello_world.flv"))
    os.remove(os.path.join(root, "AudioWAV", "1003_DFA_HAP_XX.wav"))      # a name outside the scheme

    out = str(tmp_path_factory.mktemp("bad") / "out")
    proc = run_cli("preprocess", "cremad", "--root", root, "--out", out, "--split", "ogm", "--face-fps", "1",
                   "--face-size", "224", "--allow-random-weights", "--workers", "2")
    return proc, out


GOOD = {f"1001_DFA_{e}_XX" for e in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")} | {"1002_DFA_FEA_XX", "1002_DFA_SAD_XX", "1003_DFA_ANG_XX"}
BAD = {
    "1002_DFA_ANG_XX": "truncated FLV",
    "1002_DFA_DIS_XX": "no audio",
    "1002_DFA_HAP_XX": "silent audio",
    "1002_DFA_NEU_XX": "too short",
    "1003_DFA_DIS_XX": "no face found",
    "1003_DFA_FEA_XX": "decode",
    "hello_world": "outside the CREMA-D scheme",
}


def test_run_finishes_and_reports_failures(bad_run):
    proc, out = bad_run
    assert proc.returncode == 1, proc.stderr  # finished, but some clips failed
    assert f"{len(GOOD)} clips done, {len(BAD)} failed" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_every_bad_clip_has_its_reason(bad_run):
    _, out = bad_run
    status = {s["clip_id"]: s for s in read_jsonl(os.path.join(out, "status.jsonl"))}
    assert {c for c, s in status.items() if s["status"] == "done"} == GOOD
    for clip_id, reason in BAD.items():
        assert status[clip_id]["status"] == "failed"
        assert reason in status[clip_id]["reason"], status[clip_id]


def test_shards_hold_every_good_clip(bad_run):
    import webdataset as wds

    _, out = bad_run
    urls = sorted(glob.glob(os.path.join(out, "shards", "ogm", "*.tar")))
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert set(samples) == GOOD
    long_clip = samples["1002_DFA_SAD_XX"]
    n = long_clip["json"]["frames"]["count"]
    assert n in (50, 51)  # 51 when the last frame's timestamp rounds past 50 s, as with ffmpeg
    assert long_clip["face_feats.npy"].shape[0] == n  # --face-fps 1
    assert samples["1003_DFA_ANG_XX"]["json"]["video"]["fps"] == 25
    assert samples["1002_DFA_FEA_XX"]["json"]["audio"]["seconds"] == pytest.approx(2.5, abs=0.01)


def test_rerun_does_not_retry_known_failures(bad_run):
    proc, out = bad_run
    args = json.load(open(os.path.join(out, "shards", "ogm", "shards.json")))["config"]["root"]
    again = run_cli("preprocess", "cremad", "--root", args, "--out", out, "--split", "ogm", "--face-fps", "1",
                    "--face-size", "224", "--allow-random-weights")
    assert again.returncode == 1 and "0 computed this run" in again.stdout
