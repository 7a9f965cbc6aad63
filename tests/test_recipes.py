"""The recipe contract and the ``folder`` and ``ave`` recipes: a synthetic tree in each
corpus' real layout (mp4 / H.264 + AAC, the real list-file formats) through manifest ->
preprocess -> train one epoch -> evaluate, and their bad input (clear error, or a recorded
failure with nothing lost; resumable)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from manifests.io import read_jsonl
from pipelines.recipes import get_recipe, recipe_names
from pipelines.synth.layouts import write_ave_corpus, write_folder_corpus
from tests.conftest import run_cli
from tests.test_refusals_change_nothing import tree as _tree

AVE_CLASSES = ["Church bell", "Male speech, man speaking", "Bark"]
TRAIN = ["--set", "model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32",
         "data.batch_size=4", "data.workers=0", "train.epochs=1", "train.patience=0"]


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> str:
    """3 classes x 5 clips of 2 s (mp4), 5 speakers; every second clip has a sidecar WAV."""
    root = str(tmp_path_factory.mktemp("folder") / "videos")
    write_folder_corpus(root, classes=3, per_class=5, speakers=5, sidecar_every=2)
    return root


@pytest.fixture(scope="module")
def ave_root(tmp_path_factory) -> str:
    """AVE_Dataset/ with 3 categories x 3 videos of 10 s; each event's content starts at its start."""
    return write_ave_corpus(str(tmp_path_factory.mktemp("ave") / "AVE_Dataset"), AVE_CLASSES, per_class=3)


def write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def labels_of(root: str) -> list[dict]:
    with open(os.path.join(root, "labels.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_recipe_is_registered_and_has_the_contract():
    assert {"cremad", "folder", "ave"} <= set(recipe_names())
    for name in recipe_names():
        recipe = get_recipe(name)
        assert recipe.name == name and recipe.description and recipe.root_help and recipe.default_split
        proc = run_cli("preprocess", name, "--help")
        assert proc.returncode == 0 and "--root" in proc.stdout


def test_folder_seeded_split_is_stratified_group_disjoint_and_counted(folder_root, tmp_path):
    out = str(tmp_path / "m")
    labels = os.path.join(folder_root, "labels.csv")
    proc = run_cli("manifest", "folder", "--root", folder_root, "--labels", labels, "--out", out,
                   "--group-by", "speaker", "--val-fraction", "0.2", "--test-fraction", "0.2", check=True)
    assert "15 clips" in proc.stdout and "3 classes" in proc.stdout
    clips = read_jsonl(os.path.join(out, "clips.jsonl"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["classes"] == ["class0", "class1", "class2"]
    parts_of = {}
    for c in clips:
        parts_of.setdefault(c["group"], set()).add(c["splits"]["main"])
        assert c["label"] == summary["classes"].index(c["label_name"])
    assert all(len(p) == 1 for p in parts_of.values())  # no speaker in two parts
    assert {p for ps in parts_of.values() for p in ps} == {"train", "val", "test"}
    for part, entry in summary["splits"]["main"].items():
        members = [c for c in clips if c["splits"]["main"] == part]
        assert entry["clips"] == len(members) == sum(entry["classes"].values())
        assert entry["groups"] == len({c["group"] for c in members})
    # sidecar WAVs are paired; the others use the video's own track
    assert sum("wav" in c["files"] for c in clips) == 9
    # seeded: the same seed gives the same split, another seed (usually) another
    again = str(tmp_path / "m2")
    run_cli("manifest", "folder", "--root", folder_root, "--labels", labels, "--out", again,
            "--group-by", "speaker", "--val-fraction", "0.2", "--test-fraction", "0.2", check=True)
    assert read_jsonl(os.path.join(again, "clips.jsonl")) == clips


def test_folder_split_and_windows_from_the_csv(folder_root, tmp_path):
    rows = labels_of(folder_root)
    parts = ["train", "train", "val", "test", "train"] * 3
    with_split = [{"path": r["path"], "label": r["label"], "split": p, "start": "0.5", "end": "1.5"} for r, p in zip(rows, parts)]
    labels = write_csv(tmp_path / "labels.csv", with_split)
    out = str(tmp_path / "m")
    run_cli("manifest", "folder", "--root", folder_root, "--labels", labels, "--out", out, check=True)
    clips = read_jsonl(os.path.join(out, "clips.jsonl"))
    assert [c["splits"]["main"] for c in clips] == parts
    assert all((c["start"], c["end"]) == (0.5, 1.5) and c["clip_id"].endswith("_500_1500") for c in clips)


@pytest.mark.parametrize("rows, message", [
    ([{"file": "a.mp4", "label": "x"}], "path and label"),
    ([{"path": "a.mp4", "label": "x", "split": "holdout"}], "not train, val or test"),
    ([{"path": "a.mp4", "label": "x", "start": "3", "end": "1"}], "empty or negative"),
    ([{"path": "a.mp4", "label": "x"}, {"path": "a.mp4", "label": "y"}], "name the same clip"),
])
def test_folder_bad_csv_is_refused_with_a_message(folder_root, tmp_path, rows, message):
    labels = write_csv(tmp_path / "labels.csv", rows)
    proc = run_cli("manifest", "folder", "--root", folder_root, "--labels", labels, "--out", str(tmp_path / "m"))
    text = " ".join(proc.stderr.split())
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and message in text and "Traceback" not in text
    assert not (tmp_path / "m" / "summary.json").exists()


@pytest.fixture(scope="module")
def folder_run(folder_root, tmp_path_factory) -> dict:
    """The folder corpus plus an empty, a missing and a non-video row, preprocessed once."""
    base = tmp_path_factory.mktemp("folder_run")
    root = str(base / "videos")
    shutil.copytree(folder_root, root)
    open(os.path.join(root, "class0", "empty.mp4"), "wb").close()
    open(os.path.join(root, "notes.txt"), "w").write("x")
    rows = labels_of(root) + [{"path": "class0/empty.mp4", "label": "class0", "speaker": "spk0"},
                              {"path": "class1/gone.mp4", "label": "class1", "speaker": "spk1"},
                              {"path": "notes.txt", "label": "class2", "speaker": "spk2"}]
    labels = write_csv(base / "labels.csv", rows)
    out = str(base / "out")
    args = ["preprocess", "folder", "--root", root, "--labels", labels, "--out", out, "--stages", "frames,audio,pack",
            "--val-fraction", "0.2"]
    return {"args": args, "out": out, "first": run_cli(*args), "shards": os.path.join(out, "shards", "main"), "base": base}


def test_folder_preprocess_records_bad_files_and_resumes(folder_run):
    """Missing, empty and non-video rows are recorded (manifest, coverage, status), the rest is
    packed with the classes in shards.json; a re-run computes nothing."""
    proc, out = folder_run["first"], folder_run["out"]
    assert proc.returncode == 1, proc.stderr  # clips failed: reported, not fatal
    assert "15 clips done, 3 failed" in proc.stdout
    status = {r["clip_id"]: r for r in read_jsonl(os.path.join(out, "status.jsonl"))}
    assert "empty file" in status["class0_empty"]["reason"] and "missing" in status["class1_gone"]["reason"]
    assert "not a video file" in status["notes"]["reason"]
    index = json.load(open(os.path.join(folder_run["shards"], "shards.json")))
    assert index["corpus"] == "folder" and index["classes"] == ["class0", "class1", "class2"]
    assert set(index["parts"]) == {"train", "val", "test"}
    named = sum(row["named"] for row in index["coverage"].values())
    written = sum(row["written"] for row in index["coverage"].values())
    assert (named, written) == (18, 15)  # nothing lost silently: the 3 bad rows are named and missing
    # the console names failed clips and their reasons, not only the file that lists them
    assert "failed: class1_gone at manifest:" in proc.stdout and "missing" in proc.stdout
    assert "failed clip(s) with their reasons: " + os.path.join(out, "status.jsonl") in proc.stdout
    again = run_cli(*folder_run["args"])
    assert "(0 computed this run" in again.stdout


def test_folder_refusals_leave_the_output_as_it_was(folder_run, tmp_path):
    """A split the CSV does not have, and a bad CSV header: one error, and the output folder
    (an existing one byte- and mtime-identical, a new one not created)."""
    before = _tree(folder_run["out"])
    args = list(folder_run["args"])
    proc = run_cli(*args, "--split", "kfold1")
    assert proc.returncode == 2 and "no clip belongs to split 'kfold1'" in " ".join(proc.stderr.split()), proc.stderr
    assert _tree(folder_run["out"]) == before
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.mp4,x\n")
    fresh = tmp_path / "new_out"
    args[args.index("--labels") + 1], args[args.index("--out") + 1] = str(bad), str(fresh)
    proc = run_cli(*args)
    assert proc.returncode == 2 and "the header must name path and label" in " ".join(proc.stderr.split()), proc.stderr
    assert not fresh.exists()


def test_a_re_run_rewrites_no_manifest_file(folder_run):
    before = {k: v for k, v in _tree(folder_run["out"]).items() if k.startswith("manifest")}
    run_cli(*folder_run["args"])
    after = {k: v for k, v in _tree(folder_run["out"]).items() if k.startswith("manifest")}
    assert after == before and before


@pytest.mark.slow
def test_folder_shards_train_and_evaluate_with_their_class_count(folder_run):
    shards, base = folder_run["shards"], folder_run["base"]
    index = json.load(open(os.path.join(shards, "shards.json")))
    run = str(base / "run")
    run_cli("train", "--config", "trainer/configs/resnet_mlb.yaml", "--shards", shards, "--out", run, *TRAIN, check=True)
    config = open(os.path.join(run, "config.yaml")).read()
    assert "n_classes: 3" in config
    run_cli("evaluate", "--run", run, "--split", "test", check=True)
    result = json.load(open(os.path.join(run, "eval_test.json")))
    assert result["classes"] == index["classes"] and len(result["confusion"]) == 3
    mismatch = run_cli("train", "--config", "trainer/configs/resnet_mlb.yaml", "--shards", shards, "--out",
                       str(base / "run2"), *TRAIN, "model.n_classes=6")
    text = " ".join(mismatch.stderr.split())
    assert mismatch.returncode != 0 and "model.n_classes is 6" in text and "has 3 classes" in text and "Traceback" not in text


def test_ave_lists_are_parsed_and_ambiguous_videos_recorded(ave_root, tmp_path):
    root = str(tmp_path / "AVE_Dataset")
    shutil.copytree(ave_root, root)
    first = open(os.path.join(root, "trainSet.txt")).read().splitlines()[0]
    category, vid, quality, start, end = first.split("&")
    other = next(c for c in AVE_CLASSES if c != category)
    with open(os.path.join(root, "trainSet.txt"), "a") as fh:  # a second event of another category
        fh.write(f"{other}&{vid}&good&0&2\nBark&NoSuchVideo&good&0&10\n")
    video = str(tmp_path / "mv")
    run_cli("manifest", "ave", "--root", root, "--out", video, check=True)
    clips = read_jsonl(os.path.join(video, "clips.jsonl"))
    skipped = {s["clip_id"]: s["reason"] for s in read_jsonl(os.path.join(video, "skipped.jsonl"))}
    assert "ambiguous" in skipped[vid] and "missing" in skipped["NoSuchVideo"]
    assert len(clips) == 8 and all("start" not in c for c in clips)  # whole 10 s videos
    summary = json.load(open(os.path.join(video, "summary.json")))
    assert summary["classes"] == sorted(AVE_CLASSES) and summary["splits"]["official"]["test"]["clips"] == 3
    event = str(tmp_path / "me")
    run_cli("manifest", "ave", "--root", root, "--out", event, "--clip", "event", check=True)
    windows = read_jsonl(os.path.join(event, "clips.jsonl"))
    assert len(windows) == 10 and any(c["clip_id"] == f"{vid}_0_2" and c["end"] == 2.0 for c in windows)
    bad = tmp_path / "bad"
    shutil.copytree(ave_root, bad)
    (bad / "valSet.txt").write_text("Bark&abc&good&zero&10\n")
    proc = run_cli("manifest", "ave", "--root", str(bad), "--out", str(tmp_path / "mb"))
    assert proc.returncode != 0 and "valSet.txt line 1" in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
    os.remove(bad / "testSet.txt")
    proc = run_cli("manifest", "ave", "--root", str(bad), "--out", str(tmp_path / "mb"))
    assert proc.returncode != 0 and "testSet.txt" in proc.stderr and "Traceback" not in proc.stderr


def read_samples(shards: str) -> dict[str, tuple[dict, object, object]]:
    """key -> (json, frames as the loader splits them, waveform) for every sample of a shard set."""
    import io
    import tarfile

    import numpy as np

    from trainer.sample_decode import split_strip  # the loader's own frame splitter

    out = {}
    for name in sorted(os.listdir(shards)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shards, name)) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for key in {n.split(".")[0] for n in members}:
                meta = json.loads(members[f"{key}.json"])
                out[key] = (meta, split_strip(members[f"{key}.frames.jpg"], meta),
                            np.load(io.BytesIO(members[f"{key}.wav.npy"]), allow_pickle=False))
    return out


@pytest.mark.slow
def test_ave_end_to_end_whole_videos_and_event_windows(ave_root, tmp_path):
    """Whole videos (the default): 10 frames, black until the event starts, and a run that
    takes 3 classes and OGM-GE's spread frames from shards.json. Event windows: the clip
    starts where the event's content starts, in the frames and in the audio alike."""
    import numpy as np

    out = str(tmp_path / "out")
    run_cli("preprocess", "ave", "--root", ave_root, "--out", out, "--stages", "frames,audio,pack", check=True)
    shards = os.path.join(out, "shards", "official")
    index = json.load(open(os.path.join(shards, "shards.json")))
    assert index["classes"] == sorted(AVE_CLASSES) and index["train_defaults"] == {"data.frame_sampling": "spread"}
    assert index["config"]["audio"]["seconds"] == 10.0 and index["clip_seconds"] == 10.0
    events = {}
    for line in open(os.path.join(ave_root, "Annotations.txt")).read().splitlines()[1:]:
        events[line.split("&")[1]] = float(line.split("&")[3])
    samples = read_samples(shards)
    assert len(samples) == 9
    for key, (meta, frames, wav) in samples.items():
        assert meta["frames"]["count"] == 10 and len(wav) == pytest.approx(160000, abs=400)
        assert (float(frames[0].float().mean()) < 20) == (events[key] > 0)

    run = str(tmp_path / "run")
    run_cli("train", "--config", "trainer/configs/resnet_ogm_ge.yaml", "--shards", shards, "--out", run, *TRAIN, check=True)
    config = open(os.path.join(run, "config.yaml")).read()
    assert "n_classes: 3" in config and "frame_sampling: spread" in config
    run_cli("evaluate", "--run", run, "--split", "val", check=True)
    assert json.load(open(os.path.join(run, "eval_val.json")))["classes"] == sorted(AVE_CLASSES)

    out = str(tmp_path / "event")
    run_cli("preprocess", "ave", "--root", ave_root, "--out", out, "--stages", "frames,audio,pack", "--clip", "event",
            check=True)
    shards = os.path.join(out, "shards", "official")
    assert json.load(open(os.path.join(shards, "shards.json")))["train_defaults"] == {"data.frame_sampling": "consecutive"}
    for key, (meta, frames, wav) in read_samples(shards).items():
        assert meta["frames"]["count"] == int(meta["end"] - meta["start"])
        assert len(wav) == pytest.approx((meta["end"] - meta["start"]) * 16000, abs=400)
        assert float(frames[0].float().mean()) > 40 and float(np.abs(wav[:1600]).mean()) > 1000, key
