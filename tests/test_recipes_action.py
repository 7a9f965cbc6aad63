"""UCF-101 (RGB + flow), VGGSound and Kinetics-Sounds recipes on synthetic trees in each
corpus' real layout and naming: manifest, preprocess, shards, and (slow) train + evaluate."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pipelines.recipes._youtube import CLIP_NAME, index_clips
from pipelines.synth.action import UCF_CLASSES, synth_kinetics_sounds, synth_ucf101, synth_vggsound, write_youtube_clip
from tests.conftest import REPO, run_cli
from trainer.data_config import DataConfig
from trainer.loader import make_loader


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def ucf_tree(tmp_path_factory) -> str:
    """3 classes x groups 1, 2, 8, 9, 15, 16, 22 (split N tests groups 7N-6..7N): 21 clips of 2 s."""
    root = str(tmp_path_factory.mktemp("ucf") / "UCF101")
    synth_ucf101(root)
    return root


@pytest.fixture(scope="session")
def ucf_out(ucf_tree, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ucf_out"))
    run_cli("preprocess", "ucf101", "--root", ucf_tree, "--out", out, "--val-groups", "1", check=True)
    return out


@pytest.fixture(scope="session")
def vgg_tree(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("vgg"))
    return root, synth_vggsound(root, per_class={"train": 2, "test": 1}, missing=1)


# ------------------------------------------------------------------ UCF-101


def test_ucf101_splits_are_the_official_lists_with_group_disjoint_val(ucf_tree, tmp_path):
    out = str(tmp_path / "manifest")
    run_cli("manifest", "ucf101", "--root", ucf_tree, "--out", out, "--val-groups", "1", check=True)
    clips, summary = read_jsonl(os.path.join(out, "clips.jsonl")), read_json(os.path.join(out, "summary.json"))
    assert summary["classes"] == list(UCF_CLASSES) and len(clips) == 21
    for n, split in enumerate(("ucf1", "ucf2", "ucf3"), 1):
        test_groups = set(range(7 * n - 6, 7 * n + 1))
        parts: dict[str, set[int]] = {}
        for c in clips:
            parts.setdefault(c["splits"][split], set()).add(c["meta"]["group"])
        assert parts["test"] == test_groups & {1, 2, 8, 9, 15, 16, 22}
        assert len(parts["val"]) == 1 and not parts["val"] & parts["train"] and not parts["val"] & parts["test"]
        assert summary["val_groups"][split] == sorted(parts["val"])
    # The files say HandStandPushups, classInd says HandstandPushups: the list's folder decides.
    hand = [c for c in clips if c["clip_id"].startswith("v_HandStandPushups")]
    assert len(hand) == 7 and {c["label_name"] for c in hand} == {"HandstandPushups"} and {c["label"] for c in hand} == {2}


def test_ucf101_shards_hold_rgb_and_flow_and_the_flow_shows_each_class_motion(ucf_out):
    shards = os.path.join(ucf_out, "shards", "ucf1")
    index = read_json(os.path.join(shards, "shards.json"))
    assert index["corpus"] == "ucf101" and index["classes"] == list(UCF_CLASSES)
    assert set(index["keys"]) == {"cls", "json", "frames.jpg", "flow_x.jpg", "flow_y.jpg"}  # no audio
    assert {p: v["samples"] for p, v in index["parts"].items()} == {"train": 12, "val": 3, "test": 6}
    cfg = DataConfig(modalities={"rgb": "frames", "flow": "flow"}, batch_size=6, workers=0, frames=2, image_size=32)
    loader, _ = make_loader(shards, "test", cfg, train=False)
    batch = next(iter(loader))
    flow, labels = batch["inputs"]["flow"]["x"], batch["label"]
    assert batch["inputs"]["rgb"]["x"].shape == (6, 2, 3, 32, 32) and flow.shape == (6, 2, 2, 32, 32)
    # The synthetic clips of class k drift 2 px a frame at angle 2*pi*k/3 (x right, y down):
    # the mean flow points that way (values are flow / bound 20).
    angles = 2 * torch.pi * labels.float() / 3
    mean_x, mean_y = flow[:, :, 0].mean(dim=(1, 2, 3)), flow[:, :, 1].mean(dim=(1, 2, 3))
    assert torch.allclose(mean_x, 0.1 * torch.cos(angles), atol=0.03), (mean_x, labels)
    assert torch.allclose(mean_y, 0.1 * torch.sin(angles), atol=0.03), (mean_y, labels)


def test_ucf101_missing_and_damaged_clips_are_recorded_not_lost(ucf_tree, tmp_path):
    root, out = str(tmp_path / "ucf"), str(tmp_path / "out")
    shutil.copytree(ucf_tree, root)
    folder = os.path.join(root, "UCF-101", "Basketball")
    os.remove(os.path.join(folder, "v_Basketball_g01_c01.avi"))  # listed, never downloaded
    open(os.path.join(folder, "v_Basketball_g08_c01.avi"), "wb").close()  # empty file
    with open(os.path.join(folder, "v_Basketball_g09_c01.avi"), "wb") as fh:
        fh.write(b"RIFF\x00\x01\x00\x00AVI LIST" + os.urandom(3000))  # not decodable
    proc = run_cli("preprocess", "ucf101", "--root", root, "--out", out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # two clips failed: said, not hidden
    status = {r["clip_id"]: r for r in read_jsonl(os.path.join(out, "status.jsonl"))}
    assert status["v_Basketball_g08_c01"]["stage"] == "manifest" and "empty" in status["v_Basketball_g08_c01"]["reason"]
    assert status["v_Basketball_g09_c01"]["status"] == "failed"
    assert "v_Basketball_g01_c01" not in status  # absent from the copy: no failure, a coverage count
    cov = read_json(os.path.join(out, "shards", "ucf1", "shards.json"))["coverage"]
    assert sum(r["named"] for r in cov.values()) == 21  # nothing lost: every listed clip is counted
    assert sum(r["written"] for r in cov.values()) == 18
    missing = {reason: ids for r in cov.values() for reason, ids in r["missing"].items()}
    assert [ids for reason, ids in missing.items() if reason.startswith("not in the corpus")] == [["v_Basketball_g01_c01"]]


def test_ucf101_without_its_lists_says_what_to_do(tmp_path):
    (tmp_path / "UCF-101").mkdir()
    proc = run_cli("manifest", "ucf101", "--root", str(tmp_path), "--out", str(tmp_path / "m"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "classInd.txt" in proc.stderr and "--lists" in proc.stderr


# ------------------------------------------------------------------ YouTube clips


def test_youtube_clip_names_of_the_usual_download_tools():
    for name, ytid, start in (("abcDEF12-_x_000030_000040.mp4", "abcDEF12-_x", "000030"),
                              ("abcDEF12-_x_000030.mp4", "abcDEF12-_x", "000030"),
                              ("abcDEF12-_x_30.mkv", "abcDEF12-_x", "30"), ("abcDEF12-_x.webm", "abcDEF12-_x", None)):
        match = CLIP_NAME.match(name)
        assert match is not None and (match["ytid"], match["start"]) == (ytid, start), name
    assert CLIP_NAME.match("short_30.mp4") is None and CLIP_NAME.match("abcDEF12-_x_30.txt") is None


def test_vggsound_packs_frames_and_audio_and_counts_missing_clips_per_part(vgg_tree, tmp_path):
    root, made = vgg_tree
    out = str(tmp_path / "out")
    proc = run_cli("preprocess", "vggsound", "--root", root, "--out", out)
    assert proc.returncode == 0, proc.stderr  # clips gone from YouTube are counted, not errors
    summary = read_json(os.path.join(out, "manifest", "summary.json"))
    assert summary["missing"] == {"vggsound": {"test": 3, "train": 3}} and summary["clips"] == len(made["written"])
    assert summary["classes"] == sorted({r[2] for r in made["rows"]})
    index = read_json(os.path.join(out, "shards", "vggsound", "shards.json"))
    assert {"frames.jpg", "spec.npy", "wav.npy"} <= set(index["keys"]) and not any("face" in k or "flow" in k for k in index["keys"])
    assert index["coverage"]["train"]["named"] == 9 and index["coverage"]["train"]["written"] == 6
    assert "3 not in the corpus" in proc.stdout
    cfg = DataConfig(modalities={"audio": "spec", "visual": "frames"}, batch_size=3, workers=0, frames=3, image_size=32)
    batch = next(iter(make_loader(os.path.join(out, "shards", "vggsound"), "test", cfg, train=False)[0]))
    assert batch["inputs"]["visual"]["mask"].all()  # 10 s clips: every one of 3 frames is real


def test_vggsound_whole_video_is_cut_to_the_listed_window(vgg_tree, tmp_path):
    root, made = vgg_tree
    ytid, start, part = made["missing"][0]  # give a listed-but-missing clip as its whole 14 s video
    copy = str(tmp_path / "vgg")
    shutil.copytree(root, copy)
    write_youtube_clip(os.path.join(copy, "full", f"{ytid}.mp4"), 0, 3, seconds=start + 12.0, seed=5)
    out = str(tmp_path / "out")
    run_cli("preprocess", "vggsound", "--root", copy, "--out", out, "--stages", "frames,pack", check=True)
    clip = next(c for c in read_jsonl(os.path.join(out, "manifest", "clips.jsonl")) if c["meta"]["youtube_id"] == ytid)
    assert (clip["start"], clip["end"]) == (float(start), start + 10.0) and clip["files"]["video"] == f"full/{ytid}.mp4"
    import tarfile

    for name in sorted(os.listdir(os.path.join(out, "shards", "vggsound"))):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, "shards", "vggsound", name)) as tar:
                for member in tar.getmembers():
                    if member.name == f"{clip['clip_id']}.json":
                        meta = json.loads(tar.extractfile(member).read())
    assert meta["frames"]["count"] == 10  # 10 s of the 14 s file at 1 fps


def test_vggsound_without_its_csv_or_with_a_wrong_one_says_so(tmp_path):
    proc = run_cli("manifest", "vggsound", "--root", str(tmp_path), "--out", str(tmp_path / "m"))
    assert proc.returncode != 0 and "vggsound.csv" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "vggsound.csv").write_text("label,youtube_id,time_start\nx,y,z\n")
    proc = run_cli("manifest", "vggsound", "--root", str(tmp_path), "--out", str(tmp_path / "m"))
    assert proc.returncode != 0 and "line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_kinetics_sounds_keeps_its_classes_and_counts_missing_per_part(tmp_path):
    root = str(tmp_path / "ks")
    made = synth_kinetics_sounds(root, per_class={"train": 1, "val": 1}, missing=1, seconds=1.0)
    out = str(tmp_path / "m")
    run_cli("manifest", "kinetics-sounds", "--root", root, "--out", out, check=True)
    summary = read_json(os.path.join(out, "summary.json"))
    clips = read_jsonl(os.path.join(out, "clips.jsonl"))
    assert len(summary["classes"]) == 32 and "riding a bike" not in {c["label_name"] for c in clips}
    assert summary["missing"] == {"ks": {"test": 3, "train": 3}}  # K400's val set is the test part
    assert len(clips) == len(made["written"]) and {c["splits"]["ks"] for c in clips} == {"train", "test"}
    assert "blowing nose" in summary["classes_not_in_csv"] and "typing" not in summary["classes_not_in_csv"]
    classes = tmp_path / "classes.txt"
    classes.write_text("typing\ntapping pen\n")
    run_cli("manifest", "kinetics-sounds", "--root", root, "--out", out, "--classes", str(classes), check=True)
    assert read_json(os.path.join(out, "summary.json"))["classes"] == ["tapping pen", "typing"]
    assert index_clips(root).files_seen == len(made["written"])


# ------------------------------------------------------------------ end to end (slow)


@pytest.mark.slow
def test_ucf101_rgb_flow_trains_and_evaluates(ucf_out, tmp_path):
    run = str(tmp_path / "run")
    run_cli("train", "--config", os.path.join(REPO, "trainer", "configs", "resnet_rgb_flow_mlb.yaml"),
            "--shards", os.path.join(ucf_out, "shards", "ucf1"), "--out", run,
            "--set", "train.epochs=1", "model.encoders.rgb.width=8", "model.encoders.flow.width=8", "data.image_size=32",
            "data.batch_size=4", "data.workers=0", "train.device=cpu", check=True)
    run_cli("evaluate", "--run", run, check=True)
    result = read_json(os.path.join(run, "eval_test.json"))
    assert result["samples"] == 6 and set(result["unimodal_accuracy"]) == set(result["probe_accuracy"]) == {"rgb", "flow"}
    assert len(result["confusion"]) == 3  # the corpus' 3 classes


@pytest.mark.slow
def test_vggsound_audio_visual_trains_and_evaluates(vgg_tree, tmp_path):
    root, _ = vgg_tree
    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    run_cli("preprocess", "vggsound", "--root", root, "--out", out, check=True)
    run_cli("train", "--config", os.path.join(REPO, "trainer", "configs", "resnet_joint.yaml"),
            "--shards", os.path.join(out, "shards", "vggsound"), "--out", run,
            "--set", "train.epochs=1", "model.encoders.audio.width=8", "model.encoders.visual.width=8",
            "data.image_size=32", "data.batch_size=3", "data.workers=0", "train.device=cpu", check=True)
    run_cli("evaluate", "--run", run, check=True)
    result = read_json(os.path.join(run, "eval_test.json"))
    assert result["samples"] == 3 and set(result["unimodal_accuracy"]) == {"audio", "visual"}


def test_ucf101_flow_is_exported_to_hdf5_byte_for_byte(ucf_out, tmp_path):
    import tarfile

    from pipelines.export_h5 import export_h5, read_h5_sample

    shards = os.path.join(ucf_out, "shards", "ucf1")
    out = str(tmp_path / "ucf.h5")
    export_h5(shards, out, parts=["test"])
    first = read_h5_sample(out, "test", 0)
    name = read_json(os.path.join(shards, "shards.json"))["parts"]["test"]["shards"][0]["name"]
    with tarfile.open(os.path.join(shards, name)) as tar:
        key = first["clip_id"]
        for axis in ("x", "y"):
            assert first[f"flow_{axis}_jpeg"] == tar.extractfile(f"{key}.flow_{axis}.jpg").read()
