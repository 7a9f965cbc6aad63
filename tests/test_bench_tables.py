"""docs/benchmarks.md's generated tables equal what their benchmark JSON renders, and the
renderers say what the figures say (a target verdict follows the measured ratio)."""

from __future__ import annotations

import copy
import json
import os

from bench import tables
from tests.conftest import REPO


def test_every_block_in_the_docs_is_what_its_json_renders():
    with open(os.path.join(REPO, "docs", "benchmarks.md"), encoding="utf-8") as fh:
        text = fh.read()
    found = tables.blocks(text)
    assert {name for _, name, _ in found} >= {"loader", "decode", "handover", "faces", "face_profile", "ray_engine", "cremad_estimate"}
    stale = [(path, name) for path, name, body in found if body != tables.render(path, name)]
    assert not stale, f"regenerate with `python bench/tables.py docs/benchmarks.md`: {stale}"


def test_the_loader_verdicts_follow_the_ratios():
    with open(os.path.join(REPO, "bench", "train.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    for floor_share, verdict in ((0.79, "79%, not met"), (0.81, "81%, met")):
        changed = copy.deepcopy(data)
        d = changed["loader"]
        d["cpu_ratios"]["shards_over_floor"] = floor_share
        d["samples_per_cpu_s"]["shards"] = floor_share * d["samples_per_cpu_s"]["decode_floor"]
        text = tables.loader_table(changed)
        assert f"**{verdict}**" in text
        assert f"| {floor_share:.2f} |" in text  # the shards row's share of the floor
