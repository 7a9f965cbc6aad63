"""Plan -> skip what is done -> run the rest on a local process pool -> pack -> status.

A clip is kept when its video or its audio decodes (``pipelines/quality.py`` flags what is
missing or unusual); only clips that cannot give a sample fail. Every stage output is cached per clip under a key of (stage version, config, input), so a
killed run continues where it stopped, a re-run with the same config does no work, and a
changed stage config redoes only that stage and those after it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict

from avbalance import __version__
from avbalance.errors import UserError
from avbalance.progress import progress_bar
from manifests.io import atomic_write_text, read_jsonl
from pipelines.cache import ClipCache
from pipelines.config import ALL_STAGES, PreprocessConfig
from pipelines.coverage import coverage, named_clips
from pipelines.quality import clip_quality, gives_sample, placeholder
from pipelines.recipes.cremad import prepare_cremad
from pipelines.stages.audio import AudioStage
from pipelines.stages.base import stable_hash
from pipelines.stages.face_features import face_features_key, weights_identity
from pipelines.stages.faces import FacesStage
from pipelines.stages.onnx_backend import resolve_backend
from pipelines.stages.frames import FramesStage
from pipelines.stages.pack import PackStage, samples_per_shard, shard_order
from pipelines.shards import SCHEMA_VERSION, ShardWriter, read_index, write_index
from pipelines.worker import ClipJob, init_worker, process_chunk, warm_up

CLIP_STAGES = ("frames", "faces", "face_features", "audio")
UPSTREAM = {"face_features": "faces"}


def source_key(root: str, rel: str) -> str:
    st = os.stat(os.path.join(root, rel))
    return stable_hash(rel, st.st_size, st.st_mtime_ns)


def stage_keys(cfg: PreprocessConfig, clip: dict) -> dict[str, str]:
    video = source_key(cfg.root, clip["files"]["video"])
    audio_src = source_key(cfg.root, clip["files"]["wav"]) if "wav" in clip["files"] else stable_hash(video, "track")
    keys = {"video": video, "audio_source": audio_src}
    keys["frames"] = FramesStage(cfg.frames).key(keys)
    keys["faces"] = FacesStage(cfg.faces).key(keys)
    keys["face_features"] = face_features_key(cfg.face_features, keys)
    keys["audio"] = AudioStage(cfg.audio).key(keys)
    return keys


def plan(cfg: PreprocessConfig, clips: list[dict], cache: ClipCache) -> tuple[list[ClipJob], dict[str, dict[str, str]], dict[str, dict]]:
    """Jobs for clips with work left, failures already known, and every clip's keys."""
    wanted = [s for s in CLIP_STAGES if s in cfg.stages]
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
        if "face_features" in todo and "faces" not in todo and "faces" in failed:
            todo.remove("face_features")
            failed["face_features"] = failed["faces"]
        if failed:
            known_failures[cid] = failed
        if todo:
            jobs.append(ClipJob(
                cid, os.path.join(cfg.root, clip["files"]["video"]),
                os.path.join(cfg.root, clip["files"]["wav"]) if "wav" in clip["files"] else None,
                keys, todo, face_boxes_cached="faces" not in todo and cache.done("faces", cid, keys["faces"]),
            ))
    return jobs, known_failures, all_keys


def run_jobs(cfg: PreprocessConfig, jobs: list[ClipJob]) -> dict[str, dict[str, str]]:
    """Run the jobs in chunks, in-process or on a pool; return failures by clip and stage."""
    failures: dict[str, dict[str, str]] = {}
    # Small runs still use every worker: no chunk holds more than its share of the clips.
    size = max(1, min(cfg.chunk, -(-len(jobs) // max(1, cfg.workers))))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    cores = os.cpu_count() or 1
    with progress_bar(len(jobs), "preprocess", unit="clip") as bar:
        def collect(outcomes):
            for o in outcomes:
                if o.failed:
                    failures[o.clip_id] = o.failed
            bar.update(len(outcomes))

        warm_up(cfg)
        if cfg.workers <= 1:
            init_worker(cfg, threads=cores)
            for chunk in chunks:
                collect(process_chunk(chunk))
        else:
            ctx = mp.get_context("fork")
            with ctx.Pool(cfg.workers, initializer=init_worker, initargs=(cfg, max(1, cores // cfg.workers))) as pool:
                for outcomes in pool.imap_unordered(process_chunk, chunks):
                    collect(outcomes)
    return failures


def preprocess(cfg: PreprocessConfig) -> dict:
    """The whole job; returns the run summary (also written as ``out/preprocess.json``)."""
    started = time.time()
    bad = [s for s in cfg.stages if s not in ALL_STAGES]
    if bad:
        raise UserError(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(ALL_STAGES)}")
    if "face_features" in cfg.stages and "faces" not in cfg.stages:
        raise UserError("the face_features stage needs the faces stage: add faces to --stages")
    if cfg.overwrite:
        for sub in ("cache", "shards"):
            shutil.rmtree(os.path.join(cfg.out, sub), ignore_errors=True)
    os.makedirs(cfg.out, exist_ok=True)
    cfg.backend = resolve_backend(cfg.backend, cfg.device)
    if "face_features" in cfg.stages:
        cfg.face_features = type(cfg.face_features)(
            model=cfg.face_features.model, weights=cfg.face_features.weights,
            weights_sha256=weights_identity(cfg.face_features.weights, cfg.face_features.allow_random),
            allow_random=cfg.face_features.allow_random,
        )

    timings: dict[str, float] = {}
    mark = time.time()
    manifest_dir = os.path.join(cfg.out, "manifest")
    prepare_cremad(cfg.root, manifest_dir)
    clips = read_jsonl(os.path.join(manifest_dir, "clips.jsonl"))
    skipped = read_jsonl(os.path.join(manifest_dir, "skipped.jsonl"))
    for split in cfg.splits:
        if not any(split in c["splits"] for c in clips):
            raise UserError(f"no clip belongs to split {split!r}; splits of this corpus: {sorted({s for c in clips for s in c['splits']})}")

    cache = ClipCache(os.path.join(cfg.out, "cache"))
    jobs, failures, keys = plan(cfg, clips, cache)
    timings["manifest_and_plan"], mark = time.time() - mark, time.time()
    failures.update(run_jobs(cfg, jobs) if jobs else {})
    timings["stages"], mark = time.time() - mark, time.time()

    rows = status_rows(cfg, clips, skipped, failures)
    done_ids = {s["clip_id"] for s in rows if s["status"] == "done"}
    reasons = {s["clip_id"]: f"{s['stage']}: {s['reason']}" for s in rows if s["status"] == "failed"}
    packed, coverage_by_split, flags = {}, {}, {}
    if "pack" in cfg.stages:
        for split in cfg.splits:
            result = pack_split(cfg, split, [c for c in clips if c["clip_id"] in done_ids], keys, cache, failures,
                                named_clips(split, clips, skipped), reasons)
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
        "face_backend": cfg.backend if {"faces", "face_features"} & set(cfg.stages) else None,
        "shards": packed,
        "coverage": coverage_by_split,
        "seconds": round(time.time() - started, 2),
        "phase_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    atomic_write_text(os.path.join(cfg.out, "preprocess.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def status_rows(cfg: PreprocessConfig, clips: list[dict], skipped: list[dict], failures: dict[str, dict[str, str]]) -> list[dict]:
    """Every clip: done (it gives a sample, maybe with a modality missing) or failed with the
    first failing stage and reason (neither its video nor its audio decoded, or not media)."""
    stages = [s for s in CLIP_STAGES if s in cfg.stages]
    rows = []
    for clip in clips:
        failed = failures.get(clip["clip_id"], {})
        if gives_sample(failed, stages):
            rows.append({"clip_id": clip["clip_id"], "status": "done"})
        else:
            stage = next(s for s in CLIP_STAGES if s in failed)
            rows.append({"clip_id": clip["clip_id"], "status": "failed", "stage": stage, "reason": failed[stage]})
    listed = {c["clip_id"] for c in clips}
    for s in skipped:  # files the manifest could not use
        stem = os.path.splitext(os.path.basename(s["path"]))[0]
        if stem in listed:
            continue  # e.g. a bad WAV whose clip still has its video
        listed.add(stem)
        rows.append({"clip_id": stem, "status": "failed", "stage": "manifest", "reason": f"{s['path']}: {s['reason']}"})
    rows.sort(key=lambda r: r["clip_id"])
    return rows


def write_status(cfg: PreprocessConfig, rows: list[dict], flags: dict[str, list[str]]) -> list[dict]:
    """``status.jsonl``: the rows, a kept clip's quality flag names added when it was packed."""
    rows = [{**r, "quality": flags[r["clip_id"]]} if flags.get(r["clip_id"]) else r for r in rows]
    atomic_write_text(os.path.join(cfg.out, "status.jsonl"), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


def pack_split(cfg: PreprocessConfig, split: str, clips: list[dict], keys: dict[str, dict], cache: ClipCache,
               failures: dict[str, dict[str, str]], named: dict[str, str], reasons: dict[str, str]) -> dict:
    """Write ``shards/<split>/<part>-NNNNNN.tar`` and ``shards.json`` (last), unless identical.

    Returns the samples per part, the split's coverage and each packed clip's flag names.
    """
    directory = os.path.join(cfg.out, "shards", split)
    stages = [s for s in CLIP_STAGES if s in cfg.stages]
    members = {}
    for clip in clips:
        part = clip["splits"].get(split)
        if part is not None:
            members.setdefault(part, []).append(clip)
    cov = coverage(named, {c["clip_id"] for cs in members.values() for c in cs}, reasons)
    pack_key = stable_hash("pack", PackStage.version, asdict(cfg.pack), stages, SCHEMA_VERSION, cov,
                           {p: sorted((c["clip_id"], [keys[c["clip_id"]][s] for s in stages]) for c in cs) for p, cs in members.items()})
    index = read_index(directory)
    if index is not None and index.get("pack_key") == pack_key:
        flags = {cid: sorted(f for f, ids in v["quality"].items() if cid in ids)
                 for v in index["parts"].values() for cid in {i for ids in v["quality"].values() for i in ids}}
        return {"samples": {p: v["samples"] for p, v in index["parts"].items()}, "coverage": cov, "flags": flags}

    os.makedirs(directory, exist_ok=True)
    if index is not None:
        os.remove(os.path.join(directory, "shards.json"))  # the old set is no longer complete
    packer = PackStage(cfg.pack)
    parts, key_set, flags = {}, None, {}
    for part in ("train", "val", "test"):
        if part not in members:
            continue
        by_id = {c["clip_id"]: c for c in members[part]}
        order = shard_order(list(by_id))
        writer = ShardWriter(directory, part, samples_per_shard(len(order), cfg.pack))
        part_flags: dict[str, list[str]] = {}
        try:
            for cid in progress_bar_iter(order, f"pack {split}/{part}"):
                outputs = {s: cache.load(s, cid, keys[cid][s]) if cache.done(s, cid, keys[cid][s])
                           else placeholder(s, cfg.audio, cfg.faces) for s in stages}
                done = {s: o for s, o in outputs.items() if cache.done(s, cid, keys[cid][s])}
                quality = clip_quality(by_id[cid], done, failures.get(cid, {}), stages, cfg.audio)
                for flag in quality:
                    part_flags.setdefault(flag, []).append(cid)
                flags[cid] = sorted(quality)
                writer.write(packer.sample(by_id[cid], outputs, quality))
            shards = writer.close()
        except OSError as err:
            writer.abort()
            raise UserError(f"writing shards in {directory} failed ({err}); free space and re-run: "
                            "completed stages are cached and no incomplete shard set was published") from None
        parts[part] = {"samples": len(order), "shards": shards,
                       "quality": {f: sorted(ids) for f, ids in sorted(part_flags.items())}}
        key_set = writer.keys
    stale = {n for n in os.listdir(directory) if n.endswith(".tar")} - {s["name"] for p in parts.values() for s in p["shards"]}
    for name in stale:
        os.remove(os.path.join(directory, name))
    write_index(directory, {
        "schema_version": SCHEMA_VERSION,
        "tool": f"avbalance {__version__}",
        "corpus": "cremad",
        "split": split,
        "keys": key_set,
        "parts": parts,
        "coverage": cov,
        "config": _public_config(cfg),
        "face_weights": {"path": cfg.face_features.weights, "sha256": cfg.face_features.weights_sha256,
                         "random_init": cfg.face_features.weights is None} if "face_features" in stages else None,
        "pack_key": pack_key,
    })
    return {"samples": {p: v["samples"] for p, v in parts.items()}, "coverage": cov, "flags": flags}


def progress_bar_iter(items: list, desc: str):
    with progress_bar(len(items), desc, unit="clip") as bar:
        for item in items:
            yield item
            bar.update(1)


def _public_config(cfg: PreprocessConfig) -> dict:
    """The resolved config for the index, without machine-specific run options."""
    out = cfg.as_dict()
    for k in ("out", "workers", "device", "backend", "overwrite", "chunk"):
        out.pop(k, None)
    return out
