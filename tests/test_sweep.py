"""``cli.py sweep``: grid expansion, run states, and a killed sweep that resumes without
redoing finished runs (real ``cli.py train`` processes on the synthetic shards)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from avbalance.errors import UserError
from experiments.sweep import load_sweep, run_state, run_sweep
from tests.conftest import REPO

TINY = ["model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32", "data.frames=1",
        "data.batch_size=8", "data.workers=0", "data.samples_per_epoch=16", "train.epochs=1", "train.patience=0"]


def write(tmp_path, doc: dict, name: str = "sweep.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def grid(tmp_path, **block) -> dict:
    base = {"name": "b", "preset": "resnet", "splits": ["kfold1", "kfold2"], "seeds": [0, 1],
            "methods": ["joint", "ogm_ge"], "fusions": ["late_linear", "film"]}
    return {"out": str(tmp_path / "runs"), "shards": str(tmp_path / "shards" / "{split}"), "blocks": [{**base, **block}]}


def test_expansion_covers_the_grid_and_leaves_out_unsupported_pairs(tmp_path):
    sweep = load_sweep(write(tmp_path, {**grid(tmp_path), "set": ["train.epochs=3"]}))
    ids = [r.id for r in sweep.runs]
    # joint: 2 fusions x 2 splits x 2 seeds; ogm_ge: late_linear only (film is not decomposable)
    assert len(ids) == 8 + 4 and len(set(ids)) == len(ids)
    assert "b/joint-film/kfold2-s1" in ids and "b/ogm_ge-late_linear/kfold1-s0" in ids
    assert {u["id"] for u in sweep.unsupported} == {f"b/ogm_ge-film/kfold{k}-s{s}" for k in (1, 2) for s in (0, 1)}
    assert all("decomposable" in u["reason"] for u in sweep.unsupported)
    run = next(r for r in sweep.runs if r.id == "b/joint-film/kfold2-s1")
    assert run.config == os.path.join(REPO, "trainer", "configs", "resnet_joint.yaml")
    assert run.shards == str(tmp_path / "shards" / "kfold2")
    assert run.overrides == ("model.fusion.name=film", "seed=1", "train.epochs=3")
    assert run.folder(sweep.out) == os.path.join(str(tmp_path / "runs"), "b", "joint-film", "kfold2-s1")


@pytest.mark.parametrize("change, message", [
    ({"methods": ["nope"]}, "no preset for method"),
    ({"fusions": ["nope"]}, "unknown fusion"),
    ({"seeds": []}, "`seeds` is empty"),
    ({"colour": "red"}, "unknown keys"),
])
def test_bad_sweep_files_are_clear_errors(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        load_sweep(write(tmp_path, grid(tmp_path, **change)))


def test_shards_must_be_a_template(tmp_path):
    doc = grid(tmp_path)
    doc["shards"] = "data/shards"
    with pytest.raises(UserError, match="split"):
        load_sweep(write(tmp_path, doc))


def test_shards_option_replaces_the_files_template_but_not_a_blocks_own(tmp_path):
    """`sweep --shards` (what `make demo DEMO_DIR=...` uses) points the runs at another working
    folder; a block that names its own shard sets keeps them; a non-template is refused."""
    from tests.conftest import run_cli

    doc = grid(tmp_path, splits=["kfold1"], seeds=[0], fusions=["late_linear"], methods=["joint"])
    doc["blocks"].append({**doc["blocks"][0], "name": "own", "shards": str(tmp_path / "own" / "{split}")})
    path = write(tmp_path, doc)
    runs = {r.block: r for r in load_sweep(path, shards=str(tmp_path / "elsewhere" / "{split}")).runs}
    assert runs["b"].shards == str(tmp_path / "elsewhere" / "kfold1")
    assert runs["own"].shards == str(tmp_path / "own" / "kfold1")
    proc = run_cli("sweep", "--config", path, "--dry-run", "--shards", str(tmp_path / "cli" / "{split}"), check=True)
    assert str(tmp_path / "cli" / "kfold1") in proc.stdout and str(tmp_path / "shards") not in proc.stdout, proc.stdout
    bad = run_cli("sweep", "--config", path, "--dry-run", "--shards", "no/template")
    assert bad.returncode != 0 and "--shards" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_run_state(tmp_path):
    folder = tmp_path / "run"
    assert run_state(str(folder)) == "new"
    folder.mkdir()
    (folder / "config.yaml").write_text("x: 1")
    assert run_state(str(folder)) == "new"          # killed before its first checkpoint
    (folder / "last.pt").write_bytes(b"")
    assert run_state(str(folder)) == "resume"
    (folder / "eval_test.json").write_text("{}")
    assert run_state(str(folder)) == "done"


def _tiny_sweep(tmp_path, train_shards) -> str:
    doc = {"out": str(tmp_path / "runs"), "shards": os.path.join(os.path.dirname(train_shards), "{split}"),
           "set": TINY,
           "blocks": [{"name": "t", "preset": "resnet", "splits": [os.path.basename(train_shards)], "seeds": [0],
                       "methods": ["joint", "mlb"], "fusions": ["late_linear"]}]}
    return write(tmp_path, doc)


def test_a_killed_sweep_skips_finished_runs(train_shards, tmp_path):
    path = _tiny_sweep(tmp_path, train_shards)
    sweep = load_sweep(path)
    first, second = (r.folder(sweep.out) for r in sweep.runs)
    env = {**os.environ, "AVBALANCE_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "cli.py"), "sweep", "--config", path],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while run_state(first) != "done":
            assert proc.poll() is None, "the sweep ended before its first run finished"
            assert time.time() < deadline, "the first run did not finish in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the sweep and its running train process
        proc.wait()
    assert run_state(second) != "done"
    finished_at = os.path.getmtime(os.path.join(first, "eval_test.json"))

    messages: list[str] = []
    records = run_sweep(load_sweep(path), report=messages.append)
    assert "1 finished, 1 to run" in messages[0]
    assert records[sweep.runs[0].id]["skipped"] is True
    assert records[sweep.runs[1].id]["status"] == "done"
    assert os.path.getmtime(os.path.join(first, "eval_test.json")) == finished_at   # not redone
    with open(os.path.join(first, "train.log"), encoding="utf-8") as fh:
        assert sum(line.startswith("# ") for line in fh) == 1                       # started once
    status = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [r["status"] for r in status["runs"]] == ["done", "done"]
    described = json.loads(open(os.path.join(second, "sweep_run.json")).read())
    assert described["method"] == "mlb" and described["fusion"] == "late_linear"

    # A third call has nothing to do.
    messages.clear()
    run_sweep(load_sweep(path), report=messages.append)
    assert "2 finished, 0 to run" in messages[0]


def test_sweep_wide_encoder_settings_skip_one_modality_runs(tmp_path):
    """A sweep-wide `model.encoders.visual.width` reaches the runs that have a visual encoder
    and is left out of the audio-only control (instead of adding an encoder without data)."""
    from experiments.sweep import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("out: runs\nshards: sh/{split}\nset: [model.encoders.visual.width=8, model.encoders.audio.width=4]\n"
                    "blocks:\n  - {name: b, preset: resnet, splits: [kfold1], seeds: [0], methods: [audio_only, joint], "
                    "fusions: [late_linear]}\n")
    runs = {r.method: r for r in load_sweep(str(path)).runs}
    assert "model.encoders.visual.width=8" not in runs["audio_only"].overrides
    assert "model.encoders.audio.width=4" in runs["audio_only"].overrides
    assert {"model.encoders.visual.width=8", "model.encoders.audio.width=4"} <= set(runs["joint"].overrides)


def test_dry_run_lists_only_the_selected_runs_and_warns_of_missing_shards(tmp_path):
    from tests.conftest import run_cli

    path = write(tmp_path, grid(tmp_path))
    proc = run_cli("sweep", "--config", path, "--dry-run", "--only", "b/joint-film/*", check=True)
    listed = [ln for ln in proc.stdout.splitlines() if ln.startswith("new ")]
    assert len(listed) == 4 and all("b/joint-film/" in ln for ln in listed), proc.stdout
    assert "4 of 12 runs (--only b/joint-film/*)" in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and all("holds no shards.json" in w for w in warnings), proc.stderr  # kfold1, kfold2


def test_only_counts_the_selected_runs_and_a_failure_keeps_the_whole_message(tmp_path):
    doc = grid(tmp_path, splits=["kfold1"], seeds=[0], fusions=["late_linear"], methods=["joint", "mlb"])
    doc["set"] = TINY
    messages: list[str] = []
    records = run_sweep(load_sweep(write(tmp_path, doc)), only="b/mlb-*", report=messages.append)
    assert "1 of 2 runs selected by --only 'b/mlb-*' (0 finished, 1 to run)" in messages[0], messages
    assert any("warning:" in m and "holds no shards.json" in m for m in messages), messages
    (record,) = records.values()
    assert record["status"] == "failed"
    # The whole error paragraph, not the last line of a wrapped message.
    assert record["reason"].startswith("error: no shards.json in ") and re.search(r"run `\S*(python \S*cli.py|avbalance) preprocess` first", record["reason"])
    assert any(record["reason"] in m for m in messages if "FAILED" in m)


def test_only_takes_several_globs_and_shards_may_name_the_block(tmp_path):
    doc = grid(tmp_path, splits=["kfold1"], seeds=[0, 1], fusions=["late_linear"], methods=["joint", "mlb", "ogm_ge"])
    doc["blocks"].append({**doc["blocks"][0], "name": "c"})
    doc["shards"] = str(tmp_path / "{block}" / "shards" / "{split}")
    sweep = load_sweep(write(tmp_path, doc))
    by_id = {r.id: r for r in sweep.runs}
    # Each block reads the shards of its own name.
    assert by_id["b/mlb-late_linear/kfold1-s1"].shards == str(tmp_path / "b" / "shards" / "kfold1")
    assert by_id["c/mlb-late_linear/kfold1-s1"].shards == str(tmp_path / "c" / "shards" / "kfold1")
    from experiments.sweep import selected

    kept = {s.id for s in selected(sweep, "*/joint-*, b/mlb-*")}
    assert kept == {f"{b}/joint-late_linear/kfold1-s{s}" for b in "bc" for s in (0, 1)} | \
        {f"b/mlb-late_linear/kfold1-s{s}" for s in (0, 1)}
    with pytest.raises(UserError, match="matches none"):
        selected(sweep, "x/*,y/*")
    doc["shards"] = str(tmp_path / "{corpus}" / "{split}")
    with pytest.raises(UserError, match=r"only \{split\} and \{block\}"):
        load_sweep(write(tmp_path, doc))
