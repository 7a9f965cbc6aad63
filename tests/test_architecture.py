"""Arrows between the rooms point one way (docs/layout.md): the trainer reads shards through
``avbalance/shard_format.py`` and imports nothing from ``pipelines/``; the shard format's
names are written once, there."""

from __future__ import annotations

import ast
import glob
import os
import re

from tests.conftest import REPO


def imported_modules(path: str) -> set[str]:
    """Every module a file imports, at any depth (late imports inside functions included)."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_trainer_imports_nothing_from_pipelines():
    files = glob.glob(os.path.join(REPO, "trainer", "**", "*.py"), recursive=True)
    assert len(files) > 20
    offenders = {os.path.relpath(f, REPO): sorted(m for m in imported_modules(f) if m.split(".")[0] == "pipelines")
                 for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_member_names_are_written_only_in_the_shard_format_module():
    """A sample member's name as a string literal appears in no reader or writer but the format module."""
    members = re.compile(r"""["'](frames\.jpg|flow_[xy]\.jpg|faces\.jpg|face_(mask|boxes|times|feats)\.npy|wav\.npy|spec\.npy)["']""")
    code = [f for pattern in ("trainer/**/*.py", "pipelines/**/*.py", "avbalance/*.py")
            for f in glob.glob(os.path.join(REPO, pattern), recursive=True)]
    found = {}
    for path in code:
        with open(path, encoding="utf-8") as fh:
            hits = [m.group(1) for m in members.finditer(fh.read())]
        if hits:
            found[os.path.relpath(path, REPO)] = hits
    assert set(found) == {os.path.join("avbalance", "shard_format.py")}, found


# The loader, split by job (shards -> batches); loader.py composes the others.
DATA_MODULES = ("data_config", "shard_index", "shard_reader", "sample_decode", "batching", "corrupt", "loader")
TRAINING_SIDE = ("trainer.loop", "trainer.evaluate", "trainer.eval_pass", "trainer.run_model", "trainer.model",
                 "trainer.balancing", "trainer.encoders", "trainer.fusion")


def test_the_data_modules_import_nothing_from_training_and_only_the_loader_composes_them():
    for name in DATA_MODULES:
        path = os.path.join(REPO, "trainer", f"{name}.py")
        imported = imported_modules(path)
        assert not {m for m in imported if m.startswith(TRAINING_SIDE)}, name
        if name != "loader":
            assert "trainer.loader" not in imported, name
    assert not os.path.exists(os.path.join(REPO, "trainer", "data.py"))  # split by job: no catch-all module


def test_no_process_wide_log_of_damaged_samples():
    """Whoever makes the loaders owns the ``CorruptLog`` they count into; no module keeps one."""
    for name in DATA_MODULES:
        path = os.path.join(REPO, "trainer", f"{name}.py")
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        made = [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "CorruptLog"]
        assert not made, name
