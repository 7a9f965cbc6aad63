"""Run a grid of training runs from one YAML file: methods x fusions x presets x splits x seeds.

A sweep file::

    out: runs/paper                       # where the run folders go (``--out`` overrides)
    shards: data/cremad/shards/{split}    # a shard set per split; {split} is filled in
    set: [train.bf16=true]                # overrides for every run (optional)
    blocks:
      - name: resnet_ogm                  # a block is one sub-grid
        preset: resnet                    # trainer/configs/resnet_<method>.yaml, or a path with {method}
        splits: [ogm]
        methods: [audio_only, visual_only, joint, mlb]   # preset suffixes: the controls too
        fusions: [late_linear, film]
        seeds: [0]
        set: [train.epochs=100]           # overrides for this block (optional)
        shards: other/shards/{split}      # this block's own shard sets (optional)

Each run lives in ``<out>/<block>/<method>-<fusion>/<split>-s<seed>/`` and is one
``cli.py train`` process (so a crash or a kill loses one run, not the sweep). A run is
finished when its ``eval_<test part>.json`` exists: a re-run skips it, resumes a run with a
``last.pt`` and restarts one killed before its first checkpoint. Combinations that cannot
run (OGM-GE and MMCosine on a non-decomposable fusion, a one-modality control with a fusion
that needs two) are listed as unsupported and not run: the sweep reads each preset's
balancing method and modalities to tell. ``sweep.json`` in ``out`` records every run's status and is rewritten after each run.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from avbalance.errors import UserError
from avbalance.invocation import prog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "cli.py")
BLOCK_KEYS = {"name", "preset", "splits", "methods", "fusions", "seeds", "set", "shards"}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    id: str
    block: str
    preset: str
    method: str
    fusion: str
    split: str
    seed: int
    config: str
    shards: str
    overrides: tuple[str, ...] = ()

    def folder(self, root: str) -> str:
        return os.path.join(root, *self.id.split("/"))

    def describe(self) -> dict[str, Any]:
        """What ``sweep_run.json`` holds (read by the report)."""
        return {"id": self.id, "block": self.block, "preset": self.preset, "method": self.method,
                "fusion": self.fusion, "split": self.split, "seed": self.seed}


@dataclass
class Sweep:
    """A loaded sweep file: the runs to do and the combinations left out."""

    path: str
    out: str
    runs: list[RunSpec] = field(default_factory=list)
    unsupported: list[dict[str, str]] = field(default_factory=list)


def _list(block: dict, key: str, where: str) -> list:
    value = block.get(key)
    if value is None:
        raise UserError(f"{where}: missing `{key}` (a list)")
    value = value if isinstance(value, list) else [value]
    if not value:
        raise UserError(f"{where}: `{key}` is empty")
    return value


def _preset_path(preset: str, method: str, base_dir: str) -> str:
    if preset.endswith(".yaml") or "/" in preset:
        path = preset.format(method=method)
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))
    return os.path.join(REPO, "trainer", "configs", f"{preset}_{method}.yaml")


def preset_balancing(config: str) -> tuple[str, list[str]]:
    """The balancing method a preset file trains with, and its modalities (in order).

    A sweep's method name is the preset's suffix: ``audio_only`` names the preset
    ``<family>_audio_only.yaml``, a one-modality model trained with ``joint``.
    """
    from trainer.config import load_config

    cfg = load_config(config)
    return str(cfg["balancing"].get("name")), list(cfg["model"]["encoders"])


def for_modalities(overrides: list[str], modalities: list[str]) -> list[str]:
    """The overrides that apply to a model of ``modalities``: a sweep-wide setting of another
    modality's encoder (``model.encoders.visual.width=16``) is left out of a one-modality run
    rather than adding an encoder that the data does not feed."""
    def applies(text: str) -> bool:
        key = text.split("=", 1)[0].strip().split(".")
        return not (len(key) >= 3 and key[:2] == ["model", "encoders"] and key[2] not in modalities)
    return [o for o in overrides if applies(o)]


def unsupported_reason(method: str, fusion: str, config: str | None = None) -> str | None:
    """Why ``method`` (the preset ``config`` when given) cannot run with ``fusion``, or None:
    the method's ``requires`` and minimum modalities, and the fusion's, against the model."""
    from trainer.balancing import BALANCERS
    from trainer.fusion import FUSIONS

    balancer, modalities = preset_balancing(config) if config else (method, None)
    if balancer not in BALANCERS:
        raise UserError(f"unknown balancing method {balancer!r}{f' (in {config})' if config else ''}; "
                        f"known: {', '.join(BALANCERS.names())}")
    if fusion not in FUSIONS:
        raise UserError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS.names())}")
    cls, fusion_cls = BALANCERS.get(balancer), FUSIONS.get(fusion)
    if "decomposable_head" in cls.requires and not getattr(fusion_cls, "decomposable", False):
        return f"{balancer} needs a decomposable fusion head; {fusion} is not"
    if modalities is not None:
        if len(modalities) < cls.min_modalities:
            return f"{balancer} needs at least {cls.min_modalities} modalities; {method} has {len(modalities)}"
        if len(modalities) < getattr(fusion_cls, "min_modalities", 1):
            return f"{fusion} needs at least {fusion_cls.min_modalities} modalities; {method} has {len(modalities)}"
    return None


def load_sweep(path: str, out: str | None = None, shards: str | None = None) -> Sweep:
    """Read and expand a sweep file; every preset must exist and every name be registered.

    ``out`` and ``shards`` replace the file's own ``out`` and top-level ``shards`` template (a
    block with its own ``shards`` keeps it), so one file serves any working folder.
    """
    if not os.path.isfile(path):
        raise UserError(f"sweep config not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            doc = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("blocks"), list) or not doc["blocks"]:
        raise UserError(f"{path}: expected a mapping with a non-empty `blocks` list")
    base_dir = os.path.dirname(os.path.abspath(path))
    def shards_template(value: Any, where: str) -> str:
        if not isinstance(value, str) or "{split}" not in value:
            raise UserError(f"{where}: `shards` must be a path template containing {{split}}, e.g. data/shards/{{split}}")
        return value

    if shards is not None:
        doc["shards"] = shards_template(shards, "--shards")
    sweep = Sweep(path=path, out=out or doc.get("out") or "")
    if not sweep.out:
        raise UserError(f"{path}: no `out` folder; set it in the file or pass --out")
    # Relative paths are relative to where the command runs (runs start in the repository).
    sweep.out = os.path.abspath(sweep.out)
    common = [str(s) for s in doc.get("set") or []]
    seen: set[str] = set()
    for i, block in enumerate(doc["blocks"]):
        where = f"{path}: blocks[{i}]"
        if not isinstance(block, dict):
            raise UserError(f"{where}: expected a mapping")
        unknown = set(block) - BLOCK_KEYS
        if unknown:
            raise UserError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(BLOCK_KEYS)}")
        name = str(block.get("name") or f"block{i}")
        preset = str(block.get("preset") or "")
        if not preset:
            raise UserError(f"{where}: missing `preset` (e.g. resnet)")
        extra = [str(s) for s in block.get("set") or []]
        # A block may read its own shards (e.g. a corpus made with other settings).
        shards_tpl = shards_template(block.get("shards", doc.get("shards")), where if "shards" in block else path)
        for method in _list(block, "methods", where):
            config = _preset_path(preset, method, base_dir)
            if not os.path.isfile(config):
                raise UserError(f"{where}: no preset for method {method!r}: {config} does not exist")
            for fusion in _list(block, "fusions", where):
                reason = unsupported_reason(str(method), fusion, config)
                for split in _list(block, "splits", where):
                    for seed in _list(block, "seeds", where):
                        run_id = f"{name}/{method}-{fusion}/{split}-s{int(seed)}"
                        if run_id in seen:
                            raise UserError(f"{where}: run {run_id} appears twice; give blocks distinct names")
                        seen.add(run_id)
                        if reason:
                            sweep.unsupported.append({"id": run_id, "reason": reason})
                            continue
                        shards = os.path.abspath(shards_tpl.format(split=split))
                        overrides = (f"model.fusion.name={fusion}", f"seed={int(seed)}",
                                     *for_modalities([*common, *extra], preset_balancing(config)[1]))
                        sweep.runs.append(RunSpec(run_id, name, preset, str(method), str(fusion), str(split), int(seed),
                                                  config, shards, overrides))
    return sweep


def run_state(folder: str) -> str:
    """``done`` (a test evaluation exists), ``resume`` (a checkpoint exists) or ``new``."""
    if not os.path.isdir(folder):
        return "new"
    if any(f.startswith("eval_") and f.endswith(".json") for f in os.listdir(folder)):
        return "done"
    return "resume" if os.path.exists(os.path.join(folder, "last.pt")) else "new"


def train_command(spec: RunSpec, folder: str, resume: bool) -> list[str]:
    cmd = [sys.executable, CLI, "train", "--config", spec.config, "--shards", spec.shards, "--out", folder]
    for item in spec.overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def failure_reason(path: str) -> str:
    """Why a run failed, from its log: the whole ``error:`` paragraph (a message may span
    lines), else the last line (a traceback's exception)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [ln.rstrip() for ln in fh if ln.strip()]
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    if starts:
        return " ".join(ln.strip() for ln in lines[starts[-1]:])
    return lines[-1].strip() if lines else ""


def _test_accuracy(folder: str) -> float | None:
    names = sorted((n for n in os.listdir(folder) if n.startswith("eval_") and n.endswith(".json")),
                   key=lambda n: n != "eval_test.json")
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            return float(json.load(fh)["accuracy"])
    return None


def execute(spec: RunSpec, root: str, env: dict[str, str]) -> dict[str, Any]:
    """Run (or resume, or skip) one run as a ``cli.py train`` process; its status record."""
    folder = spec.folder(root)
    state = run_state(folder)
    record: dict[str, Any] = {**spec.describe(), "folder": os.path.relpath(folder, root)}
    if state == "done":
        return {**record, "status": "done", "skipped": True, "accuracy": _test_accuracy(folder)}
    if state == "new" and os.path.isdir(folder):
        shutil.rmtree(folder)  # killed before its first checkpoint: nothing worth keeping
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sweep_run.json"), "w", encoding="utf-8") as fh:
        json.dump(spec.describe(), fh, indent=2)
    log_path = os.path.join(folder, "train.log")
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {' '.join(train_command(spec, folder, state == 'resume'))}\n")
        log.flush()
        code = subprocess.call(train_command(spec, folder, state == "resume"), stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=REPO)
    record.update(seconds=round(time.perf_counter() - start, 1), resumed=state == "resume", returncode=code)
    if code == 0 and run_state(folder) == "done":
        return {**record, "status": "done", "accuracy": _test_accuracy(folder)}
    return {**record, "status": "failed", "reason": failure_reason(log_path) or f"exit code {code}", "log": log_path}


def _write_status(root: str, sweep: Sweep, records: dict[str, dict]) -> None:
    doc = {"config": os.path.abspath(sweep.path), "runs": [records.get(s.id, {**s.describe(), "status": "pending"}) for s in sweep.runs],
           "unsupported": sweep.unsupported}
    tmp = os.path.join(root, "sweep.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    os.replace(tmp, os.path.join(root, "sweep.json"))


def child_env(jobs: int, slot: int, devices: list[str]) -> dict[str, str]:
    """The environment of one run: threads split between parallel runs, one device per slot."""
    env = dict(os.environ)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    env["AVBALANCE_QUIET"] = "1"
    return env


def run_sweep(sweep: Sweep, jobs: int = 1, devices: list[str] | None = None, only: str | None = None,
              report: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every pending run of ``sweep``, ``jobs`` at a time; the status record of each run."""
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    specs = selected(sweep, only)
    root = sweep.out
    os.makedirs(root, exist_ok=True)
    records: dict[str, dict] = {}
    for spec in sweep.runs:  # what is already on disk
        state = run_state(spec.folder(root))
        if state == "done":
            records[spec.id] = {**spec.describe(), "folder": spec.id, "status": "done", "skipped": True,
                                "accuracy": _test_accuracy(spec.folder(root))}
    _write_status(root, sweep, records)
    todo = [s for s in specs if records.get(s.id, {}).get("status") != "done"]
    chosen = f"{len(specs)} of {len(sweep.runs)} runs selected by --only {only!r}" if only is not None else f"{len(specs)} runs"
    report(f"sweep: {chosen} ({len(specs) - len(todo)} finished, {len(todo)} to run), "
           f"{len(sweep.unsupported)} unsupported combinations left out; {jobs} at a time; runs in {root}")
    for warning in missing_shards(todo):
        report(f"sweep: warning: {warning}")
    slots: queue.Queue[int] = queue.Queue()
    for i in range(jobs):
        slots.put(i)
    lock = threading.Lock()
    counter = iter(range(1, len(todo) + 1))

    def one(spec: RunSpec) -> None:
        slot = slots.get()
        try:
            record = execute(spec, root, child_env(jobs, slot, devices or []))
        finally:
            slots.put(slot)
        with lock:
            records[spec.id] = record
            _write_status(root, sweep, records)
            n = next(counter)
            if record["status"] == "done":
                detail = f"test accuracy {record['accuracy']:.3f}, {record.get('seconds', 0) / 60:.1f} min"
            else:
                detail = f"FAILED: {record['reason']} (log: {record['log']})"
            report(f"sweep: [{n}/{len(todo)}] {spec.id}: {detail}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, s) for s in todo]:
            future.result()
    return records


def selected(sweep: Sweep, only: str | None) -> list[RunSpec]:
    """The runs ``--only GLOB`` keeps (all without it)."""
    specs = [s for s in sweep.runs if only is None or fnmatch.fnmatch(s.id, only)]
    if only is not None and not specs:
        raise UserError(f"--only {only!r} matches none of the {len(sweep.runs)} runs")
    return specs


def missing_shards(specs: list[RunSpec]) -> list[str]:
    """One warning per shard set the runs name that holds no shards.json (those runs would fail)."""
    missing: dict[str, int] = {}
    for s in specs:
        if not os.path.exists(os.path.join(s.shards, "shards.json")):
            missing[s.shards] = missing.get(s.shards, 0) + 1
    return [f"{n} run(s) read {path}, which holds no shards.json: run `{prog()} preprocess` for that split first"
            for path, n in missing.items()]


def plan_lines(sweep: Sweep, only: str | None = None) -> tuple[list[str], list[str]]:
    """A dry run: the selected runs with the state each is in, then the unsupported
    combinations; and warnings (shard sets that do not exist yet)."""
    specs = selected(sweep, only)
    lines = [f"{run_state(s.folder(sweep.out)):6s} {s.id}  ({os.path.relpath(s.config, REPO)}, {s.shards})" for s in specs]
    lines += [f"skip   {u['id']}  ({u['reason']})" for u in sweep.unsupported]
    return lines, missing_shards(specs)


