"""`cli.py manifest cremad`: joins, splits, and every kind of bad input the issue names."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil

import pytest

from avbalance.errors import UserError
from manifests.io import read_jsonl
from pipelines.recipes.cremad import prepare_cremad
from tests.conftest import run_cli


@pytest.fixture
def corpus(synth_corpus, tmp_path) -> str:
    """A private copy of the synthetic corpus that a test may damage."""
    dst = tmp_path / "corpus"
    shutil.copytree(synth_corpus, dst)
    return str(dst)


def skipped_reasons(out: str) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in read_jsonl(os.path.join(out, "skipped.jsonl"))}


def test_manifest_joins_metadata_and_pairs_files(synth_corpus, tmp_path):
    out = str(tmp_path / "m")
    proc = run_cli("manifest", "cremad", "--root", synth_corpus, "--out", out, check=True)
    assert "36 clips" in proc.stdout
    clips = read_jsonl(os.path.join(out, "clips.jsonl"))
    assert len(clips) == 36
    clip = next(c for c in clips if c["clip_id"] == "1001_DFA_ANG_XX")
    assert clip["files"] == {"video": "VideoFlash/1001_DFA_ANG_XX.flv", "wav": "AudioWAV/1001_DFA_ANG_XX.wav"}
    assert clip["demographics"] == {"age": 51, "sex": "Male", "race": "Caucasian", "ethnicity": "Not Hispanic"}
    assert clip["sentence_text"] == "Don't forget a jacket"
    assert clip["label"] == 0 and clip["emotion_name"] == "anger"
    assert clip["votes"]["face"]["emotions"] and isinstance(clip["votes"]["voice"]["correct"], bool)
    assert clip["probe"]["wav"]["sample_rate"] == 16000
    assert clip["splits"]["ogm"] in ("train", "test")


def test_summary_counts_clips_actors_and_classes_per_split(synth_corpus, tmp_path):
    out = str(tmp_path / "m")
    summary = prepare_cremad(synth_corpus, out)
    assert summary == json.load(open(os.path.join(out, "summary.json")))
    clips = read_jsonl(os.path.join(out, "clips.jsonl"))
    for name, parts in summary["splits"].items():
        for part, entry in parts.items():
            members = [c for c in clips if c["splits"].get(name) == part]
            assert entry["clips"] == len(members) == sum(entry["classes"].values())
            assert entry["actors"] == len({c["actor"] for c in members})
    # kfold over 6 actors: every fold has all three parts, and no actor is in two parts.
    for fold in ("kfold1", "kfold2", "kfold3"):
        assert set(summary["splits"][fold]) == {"train", "val", "test"}
        parts_of_actor = {}
        for c in clips:
            parts_of_actor.setdefault(c["actor"], set()).add(c["splits"][fold])
        assert all(len(p) == 1 for p in parts_of_actor.values())


@pytest.mark.parametrize("make_root", ["missing", "file", "empty", "empty_folders"])
def test_unusable_roots_fail_with_a_message(tmp_path, make_root):
    root = tmp_path / "root"
    if make_root == "file":
        root.write_text("x")
    elif make_root == "empty":
        root.mkdir()
    elif make_root == "empty_folders":
        (root / "VideoFlash").mkdir(parents=True)
        (root / "AudioWAV").mkdir()
    proc = run_cli("manifest", "cremad", "--root", str(root), "--out", str(tmp_path / "m"))
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "m" / "summary.json").exists()


def lfs_pointer(path: str) -> None:
    data = open(path, "rb").read()
    with open(path, "w") as fh:
        fh.write(
            "version https://git-lfs.github.com/spec/v1\n"
            f"oid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
        )


def test_tree_of_lfs_pointers_names_the_problem_and_the_fix(corpus, tmp_path):
    for folder in ("VideoFlash", "AudioWAV"):
        for name in os.listdir(os.path.join(corpus, folder)):
            lfs_pointer(os.path.join(corpus, folder, name))
    proc = run_cli("manifest", "cremad", "--root", corpus, "--out", str(tmp_path / "m"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())  # the message is wrapped to the terminal: where depends on the path
    assert "Git LFS pointer" in text and "git lfs pull" in text
    with pytest.raises(UserError, match="72 of 72 files"):
        prepare_cremad(corpus, str(tmp_path / "m2"))


def test_bad_files_are_skipped_with_reasons_and_neighbours_kept(corpus, tmp_path):
    v, a = os.path.join(corpus, "VideoFlash"), os.path.join(corpus, "AudioWAV")
    lfs_pointer(os.path.join(v, "1001_DFA_ANG_XX.flv"))
    open(os.path.join(v, "1001_DFA_DIS_XX.flv"), "wb").close()  # zero bytes
    flv = os.path.join(v, "1001_DFA_FEA_XX.flv")
    os.truncate(flv, os.path.getsize(flv) // 2)
    wav = os.path.join(a, "1001_DFA_HAP_XX.wav")
    os.truncate(wav, os.path.getsize(wav) - 1000)
    os.remove(os.path.join(a, "1001_DFA_NEU_XX.wav"))  # audio missing: keep, use the flv track
    os.remove(os.path.join(v, "1001_DFA_SAD_XX.flv"))  # video missing: the wav alone is skipped
    open(os.path.join(v, "notes.txt"), "w").write("stray")
    shutil.copy(os.path.join(a, "1002_DFA_ANG_XX.wav"), os.path.join(a, "9999_DFA_ANG_XX.wav"))

    out = str(tmp_path / "m")
    proc = run_cli("manifest", "cremad", "--root", corpus, "--out", out, check=True)
    reasons = skipped_reasons(out)
    assert "Git LFS pointer" in reasons["VideoFlash/1001_DFA_ANG_XX.flv"]
    assert "git lfs pull" in reasons["VideoFlash/1001_DFA_ANG_XX.flv"]
    assert reasons["VideoFlash/1001_DFA_DIS_XX.flv"] == "empty file (0 bytes)"
    assert "VideoFlash/1001_DFA_FEA_XX.flv" not in reasons  # truncated: what precedes the cut is kept
    assert reasons["AudioWAV/1001_DFA_HAP_XX.wav"].startswith("truncated WAV")
    assert "no usable video" in reasons["AudioWAV/1001_DFA_SAD_XX.wav"]
    assert "unexpected file type" in reasons["VideoFlash/notes.txt"]
    assert "outside the CREMA-D scheme" in reasons["AudioWAV/9999_DFA_ANG_XX.wav"]
    # The wavs of clips whose video is bad are listed too, pointing at the video.
    assert "no usable video" in reasons["AudioWAV/1001_DFA_ANG_XX.wav"]

    clips = {c["clip_id"]: c for c in read_jsonl(os.path.join(out, "clips.jsonl"))}
    assert len(clips) == 36 - 3  # ANG, DIS, SAD of actor 1001 lost their video
    assert clips["1001_DFA_FEA_XX"]["probe"]["video"]["truncated"].startswith("truncated FLV")
    assert "wav" not in clips["1001_DFA_NEU_XX"]["files"]  # kept; audio from the video's track
    assert "wav" not in clips["1001_DFA_HAP_XX"]["files"]  # truncated wav dropped, clip kept
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["audio_from_video_track"] == 2
    assert summary["skipped_files"] == len(reasons)
    assert "skipped" in proc.stdout


def write_checksums(root: str, path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "sha256", "size"])
        for folder in ("VideoFlash", "AudioWAV"):
            for name in sorted(os.listdir(os.path.join(root, folder))):
                data = open(os.path.join(root, folder, name), "rb").read()
                w.writerow([f"{folder}/{name}", hashlib.sha256(data).hexdigest(), len(data)])


def test_verify_flags_a_corrupted_copy(corpus, tmp_path):
    sums = str(tmp_path / "sums.csv")
    write_checksums(corpus, sums)
    out = str(tmp_path / "m")
    clean = prepare_cremad(corpus, out, verify=True, checksums=sums)
    assert clean["verify"]["files_failed"] == 0 and clean["clips"] == 36

    flv = os.path.join(corpus, "VideoFlash", "1003_DFA_ANG_XX.flv")
    data = bytearray(open(flv, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    open(flv, "wb").write(bytes(data))
    wav = os.path.join(corpus, "AudioWAV", "1003_DFA_SAD_XX.wav")
    open(wav, "ab").write(b"\0\0")  # a size change (the probe still accepts it)

    proc = run_cli("manifest", "cremad", "--root", corpus, "--out", out, "--verify", "--checksums", sums, check=True)
    assert "2 failed" in proc.stdout or "3 failed" in proc.stdout
    reasons = skipped_reasons(out)
    assert "sha256" in reasons["VideoFlash/1003_DFA_ANG_XX.flv"]
    assert "its video failed verification" in reasons["AudioWAV/1003_DFA_ANG_XX.wav"]
    assert "size" in reasons["AudioWAV/1003_DFA_SAD_XX.wav"]
    clips = {c["clip_id"]: c for c in read_jsonl(os.path.join(out, "clips.jsonl"))}
    assert "1003_DFA_ANG_XX" not in clips
    assert clips["1003_DFA_SAD_XX"]["files"] == {"video": "VideoFlash/1003_DFA_SAD_XX.flv"}


def test_verify_against_the_official_list_rejects_synthetic_media(synth_corpus, tmp_path):
    """The synthetic corpus reuses official names with other bytes: --verify must notice."""
    with pytest.raises(UserError, match="no usable clip"):
        prepare_cremad(synth_corpus, str(tmp_path / "m"), verify=True)
