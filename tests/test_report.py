"""The report: tiny real runs (joint and MLB, two seeds each) plus one killed run, reported;
the figures, the HTML and summary.json checked against the runs' own evaluation files."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from avbalance.errors import UserError
from experiments.collect import human_accuracy
from experiments.figures import FIGURES
from experiments.report import write_report
from trainer.config import load_config
from trainer.loop import train

TINY = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
        "data.batch_size=8", "data.workers=0", "data.samples_per_epoch=16", "train.log_every=1", "train.patience=0",
        "train.epochs=2"]
# folder under the runs root -> (method, seed, sweep_run.json id or None: named by its folder)
RUNS = {
    "grid/joint_s0": ("joint", 0, "sweep/joint-s0"),
    "grid/joint_s1": ("joint", 1, None),
    "grid/deeper/mlb_s0": ("mlb", 0, "sweep/mlb-s0"),
    "mlb_s1": ("mlb", 1, None),
}
KILLED = "killed_mlb"


@pytest.fixture(scope="module")
def runs_root(train_shards, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("runs"))
    for folder, (method, seed, run_id) in RUNS.items():
        out = os.path.join(root, folder)
        train(load_config(None, [*TINY, f"balancing.name={method}", f"seed={seed}"]), train_shards, out)
        if run_id:
            with open(os.path.join(out, "sweep_run.json"), "w", encoding="utf-8") as fh:
                json.dump({"id": run_id, "preset": "resnet", "method": method, "fusion": "late_linear",
                           "split": "kfold1", "seed": seed}, fh)
    # A run killed in its second epoch: config and a log cut mid-line, no evaluation.
    killed = os.path.join(root, KILLED)
    os.makedirs(killed)
    shutil.copy(os.path.join(root, "mlb_s1", "config.yaml"), killed)
    with open(os.path.join(root, "mlb_s1", "metrics.jsonl"), encoding="utf-8") as fh:
        lines = fh.readlines()
    with open(os.path.join(killed, "metrics.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(lines[:4])
        fh.write(lines[4][:20])
    return root


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("report"))
    path = write_report(runs_root, out)
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        return path, json.load(fh)


def run_ids() -> list[str]:
    return [run_id or folder for folder, (_, _, run_id) in RUNS.items()] + [KILLED]


def eval_of(runs_root: str, folder: str) -> dict:
    with open(os.path.join(runs_root, folder, "eval_test.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_report_writes_every_figure(report):
    path, _ = report
    out = os.path.dirname(path)
    assert os.path.basename(path) == "report.html" and os.path.exists(path)
    for name in FIGURES:
        with open(os.path.join(out, name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert os.path.exists(os.path.join(out, "summary.json"))


def test_html_embeds_figures_and_links_runs(report, runs_root):
    path, _ = report
    out = os.path.dirname(path)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.count('<img src="data:image/png;base64,') == len(FIGURES)
    assert "<link" not in text and "<script" not in text  # self-contained
    for name in FIGURES:
        assert name in text
    for run_id in run_ids():
        assert f">{run_id}<" in text
    for folder in [*RUNS, KILLED]:
        for file in ("config.yaml", "metrics.jsonl"):
            rel = os.path.relpath(os.path.join(runs_root, folder, file), out)
            assert f'href="{rel}"' in text
            assert os.path.exists(os.path.join(out, rel))


def test_summary_rows_equal_the_runs_evaluations(report, runs_root):
    _, summary = report
    rows = {r["id"]: r for r in summary["runs"]}
    assert set(rows) == set(run_ids())
    assert summary["n_runs"] == 5 and summary["n_finished"] == 4
    for folder, (method, seed, run_id) in RUNS.items():
        row, ev = rows[run_id or folder], eval_of(runs_root, folder)
        assert (row["method"], row["seed"], row["fusion"], row["split"], row["preset"]) == (
            method, seed, "late_linear", "kfold1", "resnet")
        assert row["status"] == "finished"
        for key in ("accuracy", "macro_f1", "ece", "unimodal_accuracy", "best_epoch"):
            assert row[key] == ev[key], key


def test_aggregates_are_numpy_mean_and_std_of_finished_runs(report, runs_root):
    _, summary = report
    table = summary["accuracy_table"]
    assert [(r["method"], r["fusion"], r["n"]) for r in table] == [("joint", "late_linear", 2), ("mlb", "late_linear", 2)]
    for row in table:
        folders = [f for f, (m, _, _) in RUNS.items() if m == row["method"]]
        evals = [eval_of(runs_root, f) for f in folders]
        for key in ("accuracy", "macro_f1", "ece"):
            values = [e[key] for e in evals]
            assert row[key]["mean"] == pytest.approx(np.mean(values))
            assert row[key]["std"] == pytest.approx(np.std(values))
        for m in ("audio", "visual"):
            values = [e["unimodal_accuracy"][m] for e in evals]
            assert row["unimodal_accuracy"][m]["mean"] == pytest.approx(np.mean(values))
            assert row["unimodal_accuracy"][m]["std"] == pytest.approx(np.std(values))
        assert KILLED not in row["runs"]


def test_unfinished_run_is_listed_not_aggregated(report):
    path, summary = report
    row = next(r for r in summary["runs"] if r["id"] == KILLED)
    assert row["status"] == "unfinished" and row["accuracy"] is None and row["epochs"] == 1
    assert all(KILLED not in r["runs"] for r in summary["reliability"].values())
    assert all(KILLED not in r["runs"] for r in summary["agreement"].values())
    with open(path, encoding="utf-8") as fh:
        assert "<tr class=unfinished>" in fh.read()


def test_human_accuracy_in_summary(report, train_shards):
    _, summary = report
    expected = human_accuracy(train_shards, "test")
    assert expected is not None and expected["clips"] == 36
    for row in summary["runs"]:
        assert row["human"] == (expected if row["status"] == "finished" else None)
    (setting,) = summary["human"]
    for p in ("voice", "face", "audiovisual"):
        assert summary["human"][setting][p] == pytest.approx(expected[p])


def test_empty_folder_is_a_user_error(tmp_path):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    with pytest.raises(UserError, match="no runs under"):
        write_report(str(tmp_path / "runs"), str(tmp_path / "out"))
    with pytest.raises(UserError):
        write_report(str(tmp_path / "missing"), str(tmp_path / "out"))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_human_accuracy_counts_votes_per_presentation(tmp_path):
    votes = {
        "c1": {"voice": {"correct": True}, "face": {"correct": True}, "audiovisual": {"correct": True}},
        "c2": {"voice": {"correct": False}, "face": {"correct": True}, "audiovisual": {"correct": True}},
        "c3": {"voice": {"correct": False}, "face": {"correct": False}},  # no audiovisual rating
        "c4": {},  # no rating at all
    }
    shards = tmp_path / "kfold1"
    shards.mkdir()
    with tarfile.open(shards / "test-000000.tar", "w") as tar:
        for key, v in votes.items():
            _member(tar, f"{key}.cls", b"0")
            _member(tar, f"{key}.spec.npy", b"\x93NUMPY not json")
            _member(tar, f"{key}.json", json.dumps({"clip_id": key, "votes": v}).encode())
    index = {"parts": {"test": {"samples": 4, "shards": [{"name": "test-000000.tar", "samples": 4}]}}}
    (shards / "shards.json").write_text(json.dumps(index))
    got = human_accuracy(str(shards), "test")
    assert got == {"clips": 4, "rated": {"voice": 3, "face": 3, "audiovisual": 2},
                   "voice": pytest.approx(1 / 3), "face": pytest.approx(2 / 3), "audiovisual": 1.0}
    assert human_accuracy(str(tmp_path / "gone"), "test") is None
    assert human_accuracy(str(shards), "val") is None  # no such part
