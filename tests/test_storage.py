"""``preprocess --out URL``: an fsspec URL (file:// here; s3:// and gs:// go the same way)
gives the same cache, status and shards as a folder, and resumes the same way."""

from __future__ import annotations

import glob
import os

import pytest

from pipelines.storage import Storage
from tests.conftest import run_cli

ARGS = ("--split", "ogm", "--stages", "frames,audio,pack", "--workers", "2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("url") / "corpus")
    run_cli("synth", "cremad", "--out", out, "--actors", "2", "--sentences", "1", "--seed", "3", check=True)
    return out


def files(root: str) -> dict[str, bytes]:
    """Every output file but the run summaries (they hold timings), by relative path."""
    paths = glob.glob(os.path.join(root, "**", "*"), recursive=True)
    return {os.path.relpath(p, root): open(p, "rb").read() for p in sorted(paths)
            if os.path.isfile(p) and not p.endswith(("preprocess.json", "summary.json"))}


def test_file_url_writes_what_a_folder_gets_and_resumes(corpus, tmp_path):
    folder, url_root = str(tmp_path / "folder"), str(tmp_path / "url")
    run_cli("preprocess", "cremad", "--root", corpus, "--out", folder, *ARGS, check=True)
    first = run_cli("preprocess", "cremad", "--root", corpus, "--out", "file://" + url_root, *ARGS, check=True)
    assert "12 clips done, 0 failed (12 computed this run" in first.stdout
    got, want = files(url_root), files(folder)
    assert got.keys() == want.keys() and any(k.endswith(".tar") for k in got)
    assert [k for k in got if got[k] != want[k]] == []
    assert not [k for k in got if ".tmp" in k]  # every write was published whole

    again = run_cli("preprocess", "cremad", "--root", corpus, "--out", "file://" + url_root, *ARGS, check=True)
    assert "(0 computed this run" in again.stdout  # the cache was found through the URL
    assert files(url_root) == got


@pytest.mark.parametrize("url", [False, True])
def test_an_aborted_write_leaves_no_file(tmp_path, url):
    storage = Storage(("file://" if url else "") + str(tmp_path))
    sink = storage.open_write("shards/ogm/train-000000.tar")
    sink.write(b"x" * 1000)
    sink.abort()
    assert [p for p in glob.glob(str(tmp_path / "**" / "*"), recursive=True) if os.path.isfile(p)] == []
    storage.write_bytes("a/b.json", b"{}")
    assert storage.read_bytes("a/b.json") == b"{}" and storage.listdir("a") == ["b.json"]

