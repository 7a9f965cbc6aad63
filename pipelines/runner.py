"""Plan -> skip what is done -> run the rest on an engine -> pack -> status.

The engine (``pipelines/engines``: a local process pool, or Ray) only decides where chunks
of clips and pack tasks (one per output shard) run; planning, cache keys, failure records,
the shard plan and ``shards.json`` are here, so every engine writes the same bytes.

The stages, their order, cache keys and dependency checks come from the stage registry
(``pipelines/stages/base.py``: each stage's ``inputs``, ``Config`` and hooks); nothing here
names a per-clip stage except where the shard format does (the face weights in the index).

A clip is kept when its video or its audio decodes (``pipelines/quality.py`` flags what is
missing or unusual); only clips that cannot give a sample fail. Every stage output is cached
per clip under a key of (stage version, config, input), so a killed run continues where it
stopped, a re-run with the same config does no work, and a changed stage config redoes only
that stage and those after it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

from avbalance import __version__
from avbalance.errors import UserError
from avbalance.progress import progress_bar
from avbalance.shard_format import INDEX, SCHEMA_VERSION
from manifests.io import read_jsonl
from pipelines.cache import ClipCache
from pipelines.config import PreprocessConfig
from manifests.record import clip_window
from pipelines.coverage import coverage
from pipelines.engines import Engine, check_engine, make_engine
from pipelines.quality import clip_quality, gives_sample
from pipelines.recipes import Recipe, get_recipe
from pipelines.stages.base import STAGES, check_selection, clip_stages, stable_hash, stage_order
from pipelines.stages.face_features import FaceFeaturesStage
from pipelines.stages.onnx_backend import resolve_backend
from pipelines.stages.pack import PackStage, sample_bytes, samples_per_shard, shard_order
from pipelines.shards import MAX_SHARD_BYTES, ShardWriter, read_index, write_index
from pipelines.storage import Storage
from pipelines.worker import ClipJob


def source_key(root: str, rel: str) -> str:
    st = os.stat(os.path.join(root, rel))
    return stable_hash(rel, st.st_size, st.st_mtime_ns)


def stage_keys(cfg: PreprocessConfig, clip: dict) -> dict[str, str]:
    video = source_key(cfg.root, clip["files"]["video"])
    window = clip_window(clip)
    if window is not None:  # a window is another input (whole-file keys stay as they were)
        video = stable_hash(video, "window", window)
    if "wav" in clip["files"]:
        audio_src = source_key(cfg.root, clip["files"]["wav"])
        audio_src = audio_src if window is None else stable_hash(audio_src, "window", window)
    else:
        audio_src = stable_hash(video, "track")
    keys = {"video": video, "audio_source": audio_src}
    for name in clip_stages():  # in stage order: a stage's inputs have their keys before it
        stage = STAGES.get(name)
        keys[name] = stage.cache_key(stage.config_of(cfg), keys)
    return keys


def selected(cfg: PreprocessConfig) -> list[str]:
    """The run's per-clip stages, in stage order."""
    return [s for s in clip_stages() if s in cfg.stages]


def plan(cfg: PreprocessConfig, clips: list[dict], cache: ClipCache) -> tuple[list[ClipJob], dict[str, dict[str, str]], dict[str, dict]]:
    """Jobs for clips with work left, failures already known, and every clip's keys."""
    wanted = selected(cfg)
    jobs, known_failures, all_keys = [], {}, {}
    for clip in clips:
        cid = clip["clip_id"]
        keys = stage_keys(cfg, clip)
        all_keys[cid] = keys
        todo, failed = [], {}
        for stage in wanted:
            reason = cache.failure(stage, cid, keys[stage])
            if reason is not None:
                failed[stage] = reason
            elif not cache.done(stage, cid, keys[stage]):
                todo.append(stage)
        for stage in wanted:  # a stage whose input failed earlier fails for the same reason, untried
            reason = next((failed[i] for i in STAGES.get(stage).inputs if i in failed), None)
            if stage in todo and reason is not None:
                todo.remove(stage)
                failed[stage] = reason
        if failed:
            known_failures[cid] = failed
        if todo:
            jobs.append(ClipJob(
                cid, os.path.join(cfg.root, clip["files"]["video"]),
                os.path.join(cfg.root, clip["files"]["wav"]) if "wav" in clip["files"] else None,
                keys, todo, window=clip_window(clip),
            ))
    return jobs, known_failures, all_keys


def run_jobs(cfg: PreprocessConfig, jobs: list[ClipJob], engine: Engine) -> dict[str, dict[str, str]]:
    """Run the jobs in chunks on the engine; return failures by clip and stage."""
    failures: dict[str, dict[str, str]] = {}
    # Small runs still use every worker: no chunk holds more than its share of the clips.
    size = max(1, min(cfg.chunk, -(-len(jobs) // max(1, cfg.workers))))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    with progress_bar(len(jobs), "preprocess", unit="clip") as bar:
        def collect(outcomes):
            for o in outcomes:
                if o.failed:
                    failures[o.clip_id] = o.failed
            bar.update(len(outcomes))

        lost = engine.run_chunks(chunks, collect)
    if lost:
        raise UserError(f"{len(lost)} clip(s) were not processed because their workers died past every retry "
                        f"(first: {', '.join(sorted(lost)[:5])}); re-run the same command: finished clips are "
                        "cached and only these are redone, no shard set was published")
    return failures


def preprocess(cfg: PreprocessConfig) -> dict:
    """The whole job; returns the run summary (also written as ``out/preprocess.json``)."""
    started = time.time()
    check_selection(cfg.stages)  # known names, and every stage a selected one reads selected too
    check_engine(cfg)
    cfg.backend = resolve_backend(cfg.backend, cfg.device)
    for stage in [s for s in stage_order() if s in cfg.stages]:
        STAGES.get(stage).resolve(cfg)  # e.g. the face weights' sha256, before any work

    timings: dict[str, float] = {}
    mark = time.time()
    recipe = get_recipe(cfg.corpus)(**cfg.recipe_options)
    storage = Storage(cfg.out)
    # Every input is checked before the output changes: the manifest is built aside, the splits
    # checked against it, and only then is anything under --out removed or written.
    with tempfile.TemporaryDirectory(prefix="avb-manifest-") as manifest_dir:
        manifest = recipe.prepare(cfg.root, manifest_dir)
        clips = read_jsonl(os.path.join(manifest_dir, "clips.jsonl"))
        skipped = read_jsonl(os.path.join(manifest_dir, "skipped.jsonl"))
        for split in cfg.splits:
            if not any(split in c["splits"] for c in clips):
                raise UserError(f"no clip belongs to split {split!r}; splits of this corpus: "
                                f"{sorted({s for c in clips for s in c['splits']})}; nothing under {cfg.out} was changed")
        if cfg.overwrite:
            for sub in ("cache", "shards"):
                storage.rmtree(sub)
        storage.makedirs()
        publish_manifest(manifest_dir, storage)

    cache = ClipCache(storage)
    cache.scan(selected(cfg))
    jobs, failures, keys = plan(cfg, clips, cache)
    timings["manifest_and_plan"], mark = time.time() - mark, time.time()
    with make_engine(cfg) as engine:
        failures.update(run_jobs(cfg, jobs, engine) if jobs else {})
        timings["stages"], mark = time.time() - mark, time.time()

        rows = status_rows(cfg, clips, skipped, failures)
        done_ids = {s["clip_id"] for s in rows if s["status"] == "done"}
        reasons = {s["clip_id"]: f"{s['stage']}: {s['reason']}" for s in rows if s["status"] == "failed"}
        packed, coverage_by_split, flags = {}, {}, {}
        if PackStage.name in cfg.stages:
            for split in cfg.splits:
                result = pack_split(cfg, split, [c for c in clips if c["clip_id"] in done_ids], keys, failures,
                                    recipe.named_clips(split, clips, skipped), reasons, recipe, manifest, engine)
                packed[split], coverage_by_split[split] = result["samples"], result["coverage"]
                flags.update(result["flags"])
    status = write_status(cfg, rows, flags)
    timings["pack"] = time.time() - mark
    n_failed = sum(s["status"] == "failed" for s in status)
    summary = {
        "tool": f"avbalance {__version__}",
        "clips": len(status),
        "done": len(done_ids),
        "failed": n_failed,
        "computed_clips": len(jobs),
        "face_backend": cfg.backend if any(STAGES.get(s).heavy for s in cfg.stages) else None,
        "shards": packed,
        "coverage": coverage_by_split,
        "seconds": round(time.time() - started, 2),
        "phase_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    storage.write_bytes("preprocess.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def publish_manifest(manifest_dir: str, storage: Storage) -> None:
    """Copy a manifest built in ``manifest_dir`` to ``manifest/`` under the output; a file whose
    bytes are already there is left untouched (a re-run changes nothing)."""
    for name in sorted(os.listdir(manifest_dir)):
        with open(os.path.join(manifest_dir, name), "rb") as fh:
            data = fh.read()
        rel = f"manifest/{name}"
        if storage.exists(rel) and _same_manifest_file(name, storage.read_bytes(rel), data):
            continue
        storage.write_bytes(rel, data)


def _same_manifest_file(name: str, old: bytes, new: bytes) -> bool:
    """Equal bytes; for the summary, equal apart from how long the scan took."""
    if old == new:
        return True
    if name != "summary.json":
        return False
    try:
        a, b = json.loads(old), json.loads(new)
    except ValueError:
        return False
    return isinstance(a, dict) and isinstance(b, dict) and {**a, "seconds": 0} == {**b, "seconds": 0}


def status_rows(cfg: PreprocessConfig, clips: list[dict], skipped: list[dict], failures: dict[str, dict[str, str]]) -> list[dict]:
    """Every clip: done (it gives a sample, maybe with a modality missing) or failed with the
    first failing stage and reason (neither its video nor its audio decoded, or not media)."""
    order = clip_stages()
    stages = [s for s in order if s in cfg.stages]
    rows = []
    for clip in clips:
        failed = failures.get(clip["clip_id"], {})
        if gives_sample(failed, stages):
            rows.append({"clip_id": clip["clip_id"], "status": "done"})
        else:
            stage = next(s for s in order if s in failed)
            rows.append({"clip_id": clip["clip_id"], "status": "failed", "stage": stage, "reason": failed[stage]})
    listed = {c["clip_id"] for c in clips}
    for s in skipped:  # files (or list entries) the manifest could not use
        stem = s.get("clip_id") or os.path.splitext(os.path.basename(s["path"]))[0]
        if s.get("absent"):
            continue  # named by a list but not in the user's copy: coverage counts it, it did not fail
        if stem in listed:
            continue  # e.g. a bad WAV whose clip still has its video
        listed.add(stem)
        rows.append({"clip_id": stem, "status": "failed", "stage": "manifest", "reason": f"{s['path']}: {s['reason']}"})
    rows.sort(key=lambda r: r["clip_id"])
    return rows


def write_status(cfg: PreprocessConfig, rows: list[dict], flags: dict[str, list[str]]) -> list[dict]:
    """``status.jsonl``: the rows, a kept clip's quality flag names added when it was packed."""
    rows = [{**r, "quality": flags[r["clip_id"]]} if flags.get(r["clip_id"]) else r for r in rows]
    Storage(cfg.out).write_bytes("status.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    return rows


@dataclass
class ShardTask:
    """One output shard: the clips (manifest records, in shard order) and what packing needs."""

    cfg: PreprocessConfig
    directory: str  # under the output: shards/<split>
    part: str
    number: int  # the shard's number within its part
    clips: list[dict]
    keys: dict[str, dict[str, str]]
    failures: dict[str, dict[str, str]]
    stages: list[str]
    meta: dict[str, dict]  # the recipe's extra sample fields per clip (computed by the driver)


def build_sample(cfg: PreprocessConfig, cache: ClipCache, packer: PackStage, clip: dict, keys: dict[str, str],
                 failures: dict[str, str], stages: list[str], meta: dict | None) -> tuple[dict, dict]:
    """One clip's shard sample from the cache (placeholders for what it lacks) and its quality flags."""
    cid = clip["clip_id"]
    done = {s: cache.load(s, cid, keys[s]) for s in stages if cache.done(s, cid, keys[s])}
    outputs = {s: done[s] if s in done else STAGES.get(s).placeholder(cfg) for s in stages}
    quality = clip_quality(clip, done, failures, stages, cfg.audio)
    return packer.sample(clip, outputs, quality, meta=meta), quality


def pack_shard(task: ShardTask) -> dict:
    """Write one shard from the clip cache; return its index entry, its clips' flag names
    and its sample keys. Runs wherever the engine puts it."""
    cfg = task.cfg
    storage = Storage(cfg.out)
    cache = ClipCache(storage)
    packer = PackStage(cfg.pack)
    writer = ShardWriter(task.directory, task.part, len(task.clips), storage=storage, first=task.number)
    flags: dict[str, list[str]] = {}
    size = 0
    try:
        for clip in task.clips:
            cid = clip["clip_id"]
            sample, quality = build_sample(cfg, cache, packer, clip, task.keys[cid], task.failures.get(cid, {}),
                                           task.stages, task.meta.get(cid))
            flags[cid] = sorted(quality)
            size += sum(len(v) for k, v in sample.items() if k != "__key__")
            if size > MAX_SHARD_BYTES:
                writer.abort()
                raise UserError(f"shard {task.part}-{task.number:06d} of {storage.path(task.directory)} would pass "
                                f"{MAX_SHARD_BYTES >> 20} MB at {len(task.clips)} samples; re-run with a smaller "
                                "--shard-samples (stage outputs are cached: only packing is redone)")
            writer.write(sample)
        shards = writer.close()
    except OSError as err:
        writer.abort()
        raise UserError(f"writing shards in {storage.path(task.directory)} failed ({err}); free space and re-run: "
                        "completed stages are cached and no incomplete shard set was published") from None
    return {"shards": shards, "flags": flags, "keys": writer.keys}


def pack_split(cfg: PreprocessConfig, split: str, clips: list[dict], keys: dict[str, dict],
               failures: dict[str, dict[str, str]], named: dict[str, str], reasons: dict[str, str],
               recipe: Recipe, manifest: dict, engine: Engine) -> dict:
    """Write ``shards/<split>/<part>-NNNNNN.tar`` (one engine task per shard) and
    ``shards.json`` (last, once every shard is written), unless identical.

    Returns the samples per part, the split's coverage and each packed clip's flag names.
    """
    storage = Storage(cfg.out)
    directory = f"shards/{split}"
    stages = selected(cfg)
    members = {}
    for clip in clips:
        part = clip["splits"].get(split)
        if part is not None:
            members.setdefault(part, []).append(clip)
    cov = coverage(named, {c["clip_id"] for cs in members.values() for c in cs}, reasons)
    pack_key = stable_hash("pack", PackStage.version, asdict(cfg.pack), stages, SCHEMA_VERSION, cov,
                           corpus_fields(recipe, manifest),
                           {p: sorted((c["clip_id"], [keys[c["clip_id"]][s] for s in stages]) for c in cs) for p, cs in members.items()})
    index = read_index(directory, storage)
    if index is not None and index.get("pack_key") == pack_key:
        flags = {cid: sorted(f for f, ids in v["quality"].items() if cid in ids)
                 for v in index["parts"].values() for cid in {i for ids in v["quality"].values() for i in ids}}
        return {"samples": {p: v["samples"] for p, v in index["parts"].items()}, "coverage": cov, "flags": flags}

    storage.makedirs(directory)
    if index is not None:
        storage.remove(f"{directory}/{INDEX}")  # the old set is no longer complete
    tasks = []
    cache, packer = ClipCache(storage), PackStage(cfg.pack)
    for part in ("train", "val", "test"):
        if part not in members:
            continue
        by_id = {c["clip_id"]: c for c in members[part]}
        order = shard_order(list(by_id))
        # The first sample in shard order sizes the shards (pack.samples_per_shard), so both
        # engines cut the same shards before any is written.
        first = by_id[order[0]]
        first_bytes = sample_bytes(build_sample(cfg, cache, packer, first, keys[first["clip_id"]],
                                                failures.get(first["clip_id"], {}), stages, recipe.sample_meta(first))[0])
        n = samples_per_shard(len(order), cfg.pack, first_bytes)
        for number, start in enumerate(range(0, len(order), n)):
            ids = order[start:start + n]
            tasks.append(ShardTask(cfg, directory, part, number, [by_id[c] for c in ids], {c: keys[c] for c in ids},
                                   {c: failures[c] for c in ids if c in failures}, stages,
                                   {c: recipe.sample_meta(by_id[c]) for c in ids}))
    with progress_bar(len(tasks), f"pack {split}", unit="shard") as bar:
        results = engine.map(pack_shard, tasks, on_done=lambda: bar.update(1))
    parts, key_set, flags = {}, None, {}
    for task, result in zip(tasks, results):
        entry = parts.setdefault(task.part, {"samples": 0, "shards": [], "quality": {}})
        entry["samples"] += len(task.clips)
        entry["shards"] += result["shards"]
        for cid, names in result["flags"].items():
            flags[cid] = names
            for flag in names:
                entry["quality"].setdefault(flag, []).append(cid)
        key_set = result["keys"]
    for entry in parts.values():
        entry["quality"] = {f: sorted(ids) for f, ids in sorted(entry["quality"].items())}
    stale = {n for n in storage.listdir(directory) if n.endswith(".tar")} - {s["name"] for p in parts.values() for s in p["shards"]}
    for name in stale:
        storage.remove(f"{directory}/{name}")
    write_index(directory, {
        "schema_version": SCHEMA_VERSION,
        "tool": f"avbalance {__version__}",
        **corpus_fields(recipe, manifest),
        "split": split,
        "keys": key_set,
        "parts": parts,
        "coverage": cov,
        "config": _public_config(cfg),
        "face_weights": {"path": cfg.face_features.weights, "sha256": cfg.face_features.weights_sha256,
                         "random_init": cfg.face_features.weights is None} if FaceFeaturesStage.name in stages else None,
        "pack_key": pack_key,
    }, storage)
    return {"samples": {p: v["samples"] for p, v in parts.items()}, "coverage": cov, "flags": flags}


def corpus_fields(recipe: Recipe, manifest: dict) -> dict:
    """What ``shards.json`` says about the corpus: the trainer takes its class count and
    names from ``classes``, and applies ``train_defaults`` that the user did not set."""
    return {"corpus": recipe.name, "classes": list(manifest["classes"]),
            "clip_seconds": recipe.clip_seconds, "train_defaults": dict(recipe.train_defaults)}


def _public_config(cfg: PreprocessConfig) -> dict:
    """The resolved config for the index, without machine-specific run options."""
    out = cfg.as_dict()
    for k in ("out", "workers", "device", "backend", "overwrite", "chunk", "engine", "ray_address"):
        out.pop(k, None)
    out["faces"] = cfg.faces.recorded()  # options at their defaults as earlier versions wrote them
    # A stage that did not run has no settings to record: say so instead of listing its defaults
    # (e.g. face weights "random-init" for a set made without the face stages).
    for stage in ("faces", "face_features", "flow"):  # (frames, audio and pack were always recorded)
        if stage not in cfg.stages and stage in out:
            out[stage] = f"not run (stages: {','.join(cfg.stages)})"
    for stage in selected(cfg):  # a stage without a field in PreprocessConfig runs with its defaults
        if stage not in out:
            out[stage] = asdict(STAGES.get(stage).config_of(cfg))
    return out
