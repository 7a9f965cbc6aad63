"""Every command: a refused input leaves the tree it points at byte-identical (files, their
bytes and their modification times), with one ``error:`` paragraph and no traceback."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import REPO, run_cli

TINY = ["--set", "model.encoders.audio.width=4", "model.encoders.visual.width=4", "data.image_size=32",
        "data.frames=1", "data.batch_size=8", "data.workers=0", "data.samples_per_epoch=16", "train.epochs=1",
        "train.patience=0"]


def tree(root: str) -> dict[str, tuple[bytes, int]]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = (fh.read(), os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(train_shards, synth_corpus, tmp_path_factory) -> dict[str, str]:
    """A corpus, its manifest, a shard set, a finished run, its report and an HDF5 export,
    side by side in one folder (copies: the session fixtures stay untouched)."""
    root = tmp_path_factory.mktemp("world")
    corpus = str(root / "corpus")
    shutil.copytree(synth_corpus, corpus)
    pre = str(root / "pre")
    shutil.copytree(os.path.dirname(os.path.dirname(train_shards)), pre)
    shards = os.path.join(pre, "shards", os.path.basename(train_shards))
    run_cli("manifest", "cremad", "--root", corpus, "--out", str(root / "manifest"), check=True)
    run = str(root / "runs" / "joint")
    run_cli("train", "--config", "resnet_joint", "--shards", shards, "--out", run, *TINY, check=True)
    run_cli("report", "--runs", str(root / "runs"), "--out", str(root / "report"), check=True)
    run_cli("export", "h5", "--shards", shards, "--out", str(root / "set.h5"), check=True)
    with open(root / "sweep.yaml", "w", encoding="utf-8") as fh:
        fh.write(f"out: {root / 'runs'}\nshards: {shards}\nblocks:\n  - name: b\n    preset: resnet\n"
                 "    methods: [no_such_method]\n    seeds: [0]\n")
    with open(root / "sweep_ok.yaml", "w", encoding="utf-8") as fh:
        fh.write(f"out: {root / 'runs'}\nshards: {shards}\nblocks:\n  - name: b\n    preset: resnet\n"
                 "    methods: [joint]\n    seeds: [0]\n")
    return {"root": str(root), "corpus": corpus, "pre": pre, "shards": shards, "run": run}


CASES = {
    "synth": lambda w: ["synth", "cremad", "--out", w["corpus"], "--actors", "0"],
    "manifest": lambda w: ["manifest", "cremad", "--root", os.path.join(w["root"], "nowhere"), "--out",
                           os.path.join(w["root"], "manifest")],
    "preprocess": lambda w: ["preprocess", "cremad", "--root", w["corpus"], "--out", w["pre"], "--split", "vavl9",
                             "--stages", "frames,audio,pack"],
    "export": lambda w: ["export", "h5", "--shards", w["shards"], "--out", os.path.join(w["root"], "set.h5"),
                         "--parts", "nope"],
    "verify-shards": lambda w: ["verify-shards", os.path.join(w["root"], "nowhere")],
    "train": lambda w: ["train", "--config", "resnet_mlb", "--shards", w["shards"], "--out", w["run"], "--resume"],
    "evaluate": lambda w: ["evaluate", "--run", w["run"], "--split", "nope"],
    "sweep": lambda w: ["sweep", "--config", os.path.join(w["root"], "sweep.yaml")],
    "report": lambda w: ["report", "--runs", os.path.join(w["root"], "nowhere"), "--out", os.path.join(w["root"], "report")],
    # Variants: a selection that matches no run; a check against runs that are not there.
    "sweep --only": lambda w: ["sweep", "--config", os.path.join(w["root"], "sweep_ok.yaml"), "--only", "x/*,y/*"],
    "report --check": lambda w: ["report", "--summary", os.path.join(w["root"], "report", "summary.json"),
                                 "--check", os.path.join(w["root"], "nowhere")],
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_a_refused_command_leaves_every_file_as_it_was(world, command):
    before = tree(world["root"])
    proc = run_cli(*CASES[command](world))
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert tree(world["root"]) == before


def test_every_command_has_a_case():
    from tests.test_cli_usage import subcommands

    commands = {name.split()[0] for name in subcommands()}
    cased = {name.split()[0] for name in CASES}
    assert commands == cased, commands ^ cased
