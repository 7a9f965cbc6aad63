"""The report: tiny real runs (joint, MLB and the two unimodal controls, two seeds each) plus
one killed run, reported; the figures, the HTML, summary.json and the study tables checked
against the runs' own evaluation files and independent numpy/scipy computations."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from scipy import stats as sps

from avbalance.errors import UserError
from experiments import tables
from experiments.collect import human_accuracy
from experiments.figures import FIGURES
from experiments.report import write_report
from tests.conftest import REPO, run_cli
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
    "grid/audio_only_s0": ("audio_only", 0, "sweep/audio_only-s0"),
    "audio_only_s1": ("audio_only", 1, None),  # labelled audio_only from its config (one modality)
    "visual_only_s0": ("visual_only", 0, None),
    "visual_only_s1": ("visual_only", 1, None),
}
SOURCES = {"audio": "spec", "visual": "frames"}


def overrides(method: str) -> list[str]:
    """TINY for a method; a unimodal control keeps only its modality (``--set data.modalities``)."""
    if not method.endswith("_only"):
        return [*TINY, f"balancing.name={method}"]
    m = method[: -len("_only")]
    # one epoch: the controls only need to exist for the pairing (and the suite stays fast)
    return [f"data.modalities={{{m}: {SOURCES[m]}}}", *[t for t in TINY if "encoders" not in t or f".{m}." in t],
            "train.epochs=1"]
KILLED = "killed_mlb"


@pytest.fixture(scope="module")
def runs_root(train_shards, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("runs"))
    for folder, (method, seed, run_id) in RUNS.items():
        out = os.path.join(root, folder)
        train(load_config(None, [*overrides(method), f"seed={seed}"]), train_shards, out)
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


# Synthetic shards carry no human ratings: that figure is left out.
DRAWN = [name for name in FIGURES if name != "human.png"]


def test_report_writes_every_figure(report):
    path, _ = report
    out = os.path.dirname(path)
    assert os.path.basename(path) == "report.html" and os.path.exists(path)
    for name in DRAWN:
        with open(os.path.join(out, name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert not os.path.exists(os.path.join(out, "human.png"))
    assert os.path.exists(os.path.join(out, "summary.json"))


def test_html_embeds_figures_and_links_runs(report, runs_root):
    path, _ = report
    out = os.path.dirname(path)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.count('<img src="data:image/png;base64,') == len(DRAWN)
    # The page leads with the answer: the verdicts, then the imbalance figure, then the tables.
    assert text.index("What the runs show") < text.index("imbalance.png") < text.index("<h2>Imbalance study")
    assert "left out: the runs are on synthetic data" in text
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
    assert summary["n_runs"] == len(RUNS) + 1 and summary["n_finished"] == len(RUNS)
    for folder, (method, seed, run_id) in RUNS.items():
        row, ev = rows[run_id or folder], eval_of(runs_root, folder)
        assert (row["method"], row["seed"], row["fusion"], row["split"], row["preset"]) == (
            method, seed, "late_linear", "kfold1", "resnet")
        assert row["status"] == "finished"
        for key in ("accuracy", "macro_f1", "ece", "unimodal_accuracy", "best_epoch", "probe_accuracy",
                    "train_accuracy", "train_batch_accuracy"):
            assert row[key] == ev[key], key
        assert 0 <= row["train_accuracy"] <= 1 and 0 <= row["train_batch_accuracy"] <= 1


def test_aggregates_are_numpy_mean_and_sample_std_of_finished_runs(report, runs_root):
    _, summary = report
    table = summary["accuracy_table"]
    assert [(r["method"], r["fusion"], r["n"]) for r in table] == [
        (m, "late_linear", 2) for m in ("audio_only", "visual_only", "joint", "mlb")]
    for row in table:
        folders = [f for f, (m, _, _) in RUNS.items() if m == row["method"]]
        evals = [eval_of(runs_root, f) for f in folders]
        for key in ("accuracy", "macro_f1", "ece"):
            values = [e[key] for e in evals]
            assert row[key]["mean"] == pytest.approx(np.mean(values))
            assert row[key]["std"] == pytest.approx(np.std(values, ddof=1))
        for m in evals[0]["unimodal_accuracy"]:
            values = [e["unimodal_accuracy"][m] for e in evals]
            assert row["unimodal_accuracy"][m]["mean"] == pytest.approx(np.mean(values))
            assert row["unimodal_accuracy"][m]["std"] == pytest.approx(np.std(values, ddof=1))
        assert KILLED not in row["runs"]


def test_unfinished_run_is_listed_not_aggregated(report):
    path, summary = report
    row = next(r for r in summary["runs"] if r["id"] == KILLED)
    assert row["status"] == "unfinished" and row["accuracy"] is None and row["epochs"] == 1
    assert all(KILLED not in r["runs"] for r in summary["reliability"].values())
    assert all(KILLED not in r["runs"] for r in summary["agreement"].values())
    with open(path, encoding="utf-8") as fh:
        assert "<tr class=unfinished>" in fh.read()


def test_data_is_described_and_human_raters_left_out_on_synthetic_data(report, train_shards):
    path, summary = report
    assert human_accuracy(train_shards, "test")["clips"] == 36  # the shards carry (borrowed) votes ...
    assert all(row["human"] is None for row in summary["runs"])  # ... which a synthetic corpus must not use
    (setting,) = summary["human"]
    assert summary["human"][setting] is None
    with open(os.path.join(train_shards, "shards.json"), encoding="utf-8") as fh:
        root = json.load(fh)["config"]["root"]
    with open(os.path.join(root, "synth.json"), encoding="utf-8") as fh:
        synth = json.load(fh)["config"]
    data = summary["data"][setting]
    assert data["synthetic"] is True and data["face_weights_random"] is True and data["corpus"] == "cremad"
    assert data["synth"] == synth and synth["video_signal"] == 1.0
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert "synthetic CREMA-D-shaped corpus" in text and "face features from random weights" in text


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


# --- the imbalance study ----------------------------------------------------------------------

def _evals(runs_root: str, method: str) -> dict[int, dict]:
    """seed -> eval_test.json of ``method``'s runs (all on kfold1)."""
    return {seed: eval_of(runs_root, f) for f, (m, seed, _) in RUNS.items() if m == method}


def _interval(values: list[float]) -> tuple[float, float, float]:
    """mean and scipy's t-based 95 % interval, computed independently of the report."""
    res = sps.ttest_1samp(values, 0.0)
    ci = res.confidence_interval(0.95)
    return float(np.mean(values)), float(ci.low), float(ci.high)


def _check(stat: dict, values: list[float]) -> None:
    assert stat["n"] == len(values)
    assert stat["mean"] == pytest.approx(np.mean(values))
    assert stat["std"] == pytest.approx(np.std(values, ddof=1))
    if np.ptp(values) < 1e-12:  # equal values: a zero-width interval (scipy gives nan there)
        assert stat["ci"] == pytest.approx([np.mean(values)] * 2)
        return
    _, low, high = _interval(values)
    assert stat["ci"] == pytest.approx([low, high])


def test_study_numbers_match_the_runs(report, runs_root):
    _, summary = report
    (setting,) = summary["study"]
    s = summary["study"][setting]
    assert s["modalities"] == ["audio", "visual"]
    control = {m: _evals(runs_root, f"{m}_only") for m in ("audio", "visual")}
    for m in ("audio", "visual"):
        c = s["controls"][m]
        assert c["method"] == f"{m}_only" and c["n"] == 2
        _check(c["probe"], [control[m][k]["probe_accuracy"][m] for k in (0, 1)])
        assert list(control[m][0]["probe_accuracy"]) == [m]  # a control probes its one modality
    rows = {r["method"]: r for r in s["methods"]}
    assert list(rows) == ["joint", "mlb"]
    joint, mlb = _evals(runs_root, "joint"), _evals(runs_root, "mlb")
    for method, ev in (("joint", joint), ("mlb", mlb)):
        row = rows[method]
        _check(row["fused"], [ev[k]["accuracy"] for k in (0, 1)])
        for m in ("audio", "visual"):
            _check(row["probe"][m], [ev[k]["probe_accuracy"][m] for k in (0, 1)])
            frac = [ev[k]["probe_accuracy"][m] / control[m][k]["probe_accuracy"][m] for k in (0, 1)]
            _check(row["fraction"][m], frac)
    assert "vs_joint" not in rows["joint"]
    vs = rows["mlb"]["vs_joint"]
    _check(vs["fused"], [mlb[k]["accuracy"] - joint[k]["accuracy"] for k in (0, 1)])
    for m in ("audio", "visual"):
        d = [mlb[k]["probe_accuracy"][m] - joint[k]["probe_accuracy"][m] for k in (0, 1)]
        _check(vs["probe"][m], d)
        assert vs["probe"][m]["pairs"] == [["kfold1", 0], ["kfold1", 1]]
        low, high = vs["probe"][m]["ci"]
        assert vs["probe"][m]["helps"] == (low > 0) and vs["probe"][m]["hurts"] == (high < 0)
        _check(s["phenomenon"][m], [joint[k]["probe_accuracy"][m] - control[m][k]["probe_accuracy"][m] for k in (0, 1)])


def test_paired_difference_helps_only_when_the_ci_excludes_zero():
    from experiments.study import paired_difference

    base = {("f", k): 0.5 for k in range(5)}
    clear = paired_difference({("f", k): 0.6 + 0.01 * k for k in range(5)}, base)
    assert clear["helps"] and not clear["hurts"] and clear["ci"][0] > 0
    noisy = paired_difference({("f", k): 0.5 + (0.1 if k % 2 else -0.1) for k in range(5)}, base)
    assert not noisy["helps"] and not noisy["hurts"] and noisy["ci"][0] < 0 < noisy["ci"][1]
    worse = paired_difference({("f", k): 0.4 - 0.01 * k for k in range(5)}, base)
    assert worse["hurts"] and not worse["helps"]
    # only keys both sides have count; one pair gives no interval
    one = paired_difference({("f", 0): 0.7, ("g", 0): 0.1}, {("f", 0): 0.5})
    assert one["n"] == 1 and one["ci"] is None and not one["helps"]


def test_markdown_tables_from_the_saved_summary(report):
    path, summary = report
    summary_path = os.path.join(os.path.dirname(path), "summary.json")
    proc = run_cli("report", "--summary", summary_path, "--markdown", check=True)
    assert proc.stdout == tables.markdown(summary)
    (setting,) = summary["study"]
    s = summary["study"][setting]
    mlb = next(r for r in s["methods"] if r["method"] == "mlb")
    fused = mlb["fused"]
    expected = f"{100 * fused['mean']:.1f} (n = 2)"  # two seeds: the mean alone, no interval
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| mlb | 2 |"))
    assert line.split(" | ")[2] == expected and "±" not in proc.stdout
    assert "With 2 run(s) per method, no difference can be significant" in proc.stdout  # the verdict leads
    assert "| audio_only | 2 |" in proc.stdout and "| visual_only | 2 |" in proc.stdout
    assert "| mlb | 2 | " + tables.diff(mlb["vs_joint"]["fused"]) in proc.stdout  # the paired table
    assert "joint − visual_only" in proc.stdout and "synthetic CREMA-D-shaped corpus" in proc.stdout
    bad = run_cli("report", "--summary", summary_path)  # without --markdown
    assert bad.returncode == 2 and "--markdown" in bad.stderr and "Traceback" not in bad.stderr


def test_report_command_ends_with_the_short_table(runs_root, tmp_path):
    proc = run_cli("report", "--runs", runs_root, "--out", str(tmp_path / "rep"), check=True)
    lines = proc.stdout.strip().splitlines()
    with open(tmp_path / "rep" / "summary.json", encoding="utf-8") as fh:
        summary = json.load(fh)
    assert lines[-len(tables.short_lines(summary)):] == tables.short_lines(summary)
    last = {ln.split()[0]: ln.split() for ln in lines[-5:]}
    assert list(last) == ["audio_only", "visual_only", "ensemble", "joint", "mlb"]
    study = next(iter(summary["study"].values()))
    assert last["ensemble"][1] == f"{100 * study['ensemble']['fused']['mean']:.1f}"  # from the controls' logits files
    mlb = next(r for r in study["methods"] if r["method"] == "mlb")
    assert last["mlb"][1] == f"{100 * mlb['fused']['mean']:.1f}"
    assert last["mlb"][-1] == f"{100 * mlb['probe']['visual']['mean']:.1f}"  # one token a cell: means only (n = 2)


def _blocks_ok(readme: str) -> list[str]:
    """Paths of the README's study-table blocks that differ from what their summary generates."""
    with open(readme, encoding="utf-8") as fh:
        text = fh.read()
    base = os.path.dirname(os.path.abspath(readme))
    return [p for p, body in tables.blocks(text)
            if body != tables.markdown(tables.load_summary(os.path.join(base, p)))]


def test_readme_tables_equal_their_generated_tables():
    """Every `<!-- study-table:begin FILE -->` block in README.md is exactly what
    `python cli.py report --summary FILE --markdown` prints."""
    assert _blocks_ok(os.path.join(REPO, "README.md")) == []


def test_readme_block_check_catches_a_hand_edit(report, tmp_path):
    path, summary = report
    os.makedirs(tmp_path / "docs")
    shutil.copy(os.path.join(os.path.dirname(path), "summary.json"), tmp_path / "docs" / "summary.json")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- study-table:begin docs/summary.json -->\nold\n<!-- study-table:end -->\ntail\n")
    assert _blocks_ok(str(readme)) == ["docs/summary.json"]
    assert tables.main(["--check", str(readme)]) == 1
    assert tables.main([str(readme)]) == 0  # regenerates the block in place
    assert _blocks_ok(str(readme)) == [] and readme.read_text().endswith("<!-- study-table:end -->\ntail\n")
    text = readme.read_text()
    mlb_line = next(ln for ln in text.splitlines() if ln.startswith("| mlb | 2 |"))
    readme.write_text(text.replace(mlb_line, mlb_line.replace(" | 2 | ", " | 3 | ", 1)))  # a hand-typed change
    assert _blocks_ok(str(readme)) == ["docs/summary.json"]
