#!/usr/bin/env python3
"""avbalance command line: thin wrappers that parse arguments and call library functions.

    python cli.py synth cremad --out DIR
    python cli.py manifest cremad --root DIR --out DIR [--verify]
    python cli.py preprocess cremad --root DIR --out DIR
    python cli.py train --config FILE --shards DIR|URL --out RUN_DIR [--shard-cache DIR]
    python cli.py evaluate --run RUN_DIR [--split test]
    python cli.py sweep --config FILE [--engine local|ray|slurm]
    python cli.py report --runs DIR --out DIR [--markdown]
    python cli.py report --summary FILE --markdown
    python cli.py export h5 --shards DIR --out FILE.h5
    python cli.py verify-shards DIR|URL [--hash]

Bad input ends with a one-paragraph message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from avbalance.errors import UserError  # noqa: E402
from avbalance.invocation import ENV as PROG_ENV, command, detect, prog  # noqa: E402
from avbalance.ranges import Allowed, arg  # noqa: E402

CORPORA = ("cremad",)


def cmd_synth(args: argparse.Namespace) -> int:
    from pipelines.synth.cremad import SynthConfig, synth_cremad

    cfg = SynthConfig(
        out=args.out, actors=args.actors, sentences=args.sentences, seed=args.seed,
        audio_signal=args.audio_signal, video_signal=args.video_signal,
        audio_clear=args.audio_clear, video_clear=args.video_clear, workers=args.workers,
    )
    summary = synth_cremad(cfg)
    print(f"synth: wrote {summary['clips']} clips from {len(summary['actors'])} actors to {args.out}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from pipelines.recipes import get_recipe

    recipe = get_recipe(args.corpus).from_args(args)
    summary = recipe.prepare(args.root, args.out)
    groups = "".join(f", {summary[w]} {w}" for w in ("actors", "groups") if w in summary)
    print(f"manifest: {summary['clips']} clips{groups}, {len(summary['classes'])} classes -> {os.path.join(args.out, 'clips.jsonl')}")
    for split, parts in summary["splits"].items():
        if parts:
            counts = ", ".join(f"{p} {v['clips']} clips" + "".join(f"/{v[w]} {w}" for w in ("actors", "groups") if w in v)
                               for p, v in parts.items())
            print(f"  {split:7s} {counts}")
    if summary.get("verify"):
        v = summary["verify"]
        print(f"verify: {v['files_checked']} files checked, {v['files_failed']} failed, "
              f"{v['official_missing']} official files not present")
    if summary["skipped_files"]:
        print(f"skipped {summary['skipped_files']} file(s), reasons in {os.path.join(args.out, 'skipped.jsonl')}:")
        for reason, n in summary["skipped_by_reason"].items():
            print(f"  {n:6d}  {reason}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipelines.config import PreprocessConfig
    from pipelines.runner import preprocess
    from pipelines.stages.audio import AudioConfig
    from pipelines.stages.face_features import FaceFeaturesConfig
    from pipelines.stages.faces import FacesConfig
    from pipelines.stages.flow import FlowConfig
    from pipelines.stages.pack import PackConfig

    from pipelines.recipes import get_recipe

    recipe = get_recipe(args.corpus)
    if not os.path.isdir(args.root):  # the cheapest, most basic check first
        raise UserError(f"--root {args.root} is not a folder; give the {recipe.root_help}")
    if args.ray_address and args.engine != "ray":
        raise UserError(f"--ray-address {args.ray_address} is for --engine ray; add --engine ray or drop --ray-address")
    if args.device == "cuda" and args.engine == "local":  # a Ray cluster's GPUs are checked on the cluster
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    cfg = PreprocessConfig(
        root=args.root, out=args.out, corpus=args.corpus, recipe_options=recipe.from_args(args).options,
        splits=tuple(s for s in args.split.split(",") if s),
        stages=tuple(s for s in args.stages.split(",") if s),
        workers=args.workers, device=args.device, backend=args.backend, batch_size=args.batch_size, overwrite=args.overwrite,
        engine=args.engine, ray_address=args.ray_address,
        faces=FacesConfig(fps=args.face_fps, detect_fps=args.face_detect_fps, detect_scale=args.face_detect_scale,
                          min_face_size=args.face_min_size,
                          margin=args.face_margin, size=args.face_size, keep_crops=args.keep_face_crops),
        face_features=FaceFeaturesConfig(weights=args.face_weights, allow_random=args.allow_random_weights),
        audio=AudioConfig(spec=args.spec, seconds=args.spec_seconds or recipe.spec_seconds),
        flow=FlowConfig(rate=args.flow_rate, stack=args.flow_stack, bound=args.flow_bound, preset=args.flow_preset),
        pack=PackConfig(samples_per_shard=args.shard_samples, shard_mb=args.shard_mb, min_shards=args.min_shards),
    )
    summary = preprocess(cfg)
    for split, parts in summary["shards"].items():
        counts = ", ".join(f"{p} {n}" for p, n in parts.items())
        print(f"shards: {os.path.join(args.out, 'shards', split)} ({counts} samples)")
    if summary["coverage"]:
        from pipelines.coverage import table_lines

        print("clips per part: named by the split list, written to the shards, missing (ids and reasons: coverage in shards.json)")
        for split, cov in summary["coverage"].items():
            print("\n".join(table_lines(split, cov)))
    print(f"preprocess: {summary['done']} clips done, {summary['failed']} failed "
          f"({summary['computed_clips']} computed this run, {summary['seconds']} s)")
    if summary["failed"]:
        print_failed(os.path.join(args.out, "status.jsonl"), summary["failed"])
        return 1
    return 0


def print_failed(status_path: str, n_failed: int, shown: int = 3) -> None:
    """The first failed clips with their stage and reason, and where the rest are listed."""
    from manifests.io import read_jsonl

    failed = [r for r in read_jsonl(status_path) if r.get("status") == "failed"] if os.path.exists(status_path) else []
    for row in failed[:shown]:
        print(f"  failed: {row['clip_id']} at {row.get('stage')}: {row.get('reason')}")
    more = n_failed - min(shown, len(failed))
    print(f"{'and ' + str(more) + ' more ' if more > 0 else ''}failed clip(s) with their reasons: {status_path}")


def cmd_verify_shards(args: argparse.Namespace) -> int:
    from pipelines.verify_shards import verify_shards

    records = verify_shards(args.dir, hashes=args.hash)
    for r in records:
        print(f"{r['status']:7s} {r['part']:5s} {r['name']}: {r['detail']}")
    damaged = [r for r in records if r["status"] not in ("ok", "stray")]
    checked = "sizes and sha256" if args.hash else "sizes (add --hash to check every byte)"
    print(f"verify-shards: {len(records) - len(damaged)} of {len(records)} shard(s) ok, {len(damaged)} damaged; checked {checked}")
    return 1 if damaged else 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipelines.export_h5 import export_h5

    parts = [p for p in args.parts.split(",") if p] if args.parts else None
    summary = export_h5(args.shards, args.out, parts=parts)
    counts = ", ".join(f"{p} {n}" for p, n in summary["parts"].items())
    state = "up to date, nothing written" if summary.get("up_to_date") else "written"
    print(f"export: {counts} samples -> {summary['out']} ({summary['bytes'] / 1e6:.1f} MB; {state})")
    return 0


def set_items(groups: list[list[str]] | None) -> list[str]:
    """The ``--set`` values; ``--set key value`` (a space instead of ``=``) gets a clear message."""
    items = [item for group in groups or [] for item in group]
    for i, item in enumerate(items):
        if "=" not in item:
            hint = f"--set {item}={items[i + 1]}" if i + 1 < len(items) and "=" not in items[i + 1] else f"--set {item}=VALUE"
            raise UserError(f"--set expects KEY=VALUE as one word, got {item!r}; write {hint}")
    return items


def use_shard_cache(args: argparse.Namespace) -> None:
    """``--shard-cache DIR``: remote shards read to their end are kept there. An environment
    variable, because loader workers and torchrun's other ranks inherit it."""
    from avbalance.remote import CACHE_ENV

    if args.shard_cache:
        os.environ[CACHE_ENV] = os.path.abspath(args.shard_cache)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.resume import requested_config
    from trainer.run_config import RunConfig

    use_shard_cache(args)
    overrides = set_items(args.set)
    cfg = requested_config(args.out, args.config, overrides) if args.resume else load_config(args.config, overrides)
    from trainer.loop import train  # torch loads only once the settings are known to be valid

    metrics = train(cfg, args.shards, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        if metrics.get("already_finished"):
            run = RunConfig.from_dict(cfg)
            how = (f"early stopping ended it (train.patience={run.train.patience}); to train on, resume with a larger "
                   f"--set train.patience=N (0: off) and, if needed, train.epochs=N" if metrics.get("stopped_early")
                   else f"all {run.train.epochs} epochs done; to train on, resume with a larger --set train.epochs=N")
            print(f"train: {args.out} already finished (test accuracy {metrics['accuracy']:.3f} in "
                  f"eval_{run.data.test_part}.json): nothing to do, nothing written; {how}")
            return 0
        uni = ", ".join(f"{m} {a:.3f}" for m, a in metrics["unimodal_accuracy"].items())
        print(f"train: test accuracy {metrics['accuracy']:.3f} (macro-F1 {metrics['macro_f1']:.3f}; heads: {uni}; "
              f"linear probes: {_probes(metrics)}) from epoch {metrics['best_epoch'] + 1}; run in {args.out}")
    return 0


def _probes(metrics: dict) -> str:
    return ", ".join(f"{m} {'n/a' if a is None else format(a, '.3f')}" for m, a in metrics.get("probe_accuracy", {}).items())


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_run

    use_shard_cache(args)
    m = evaluate_run(args.run, args.split, shards=args.shards, checkpoint=args.checkpoint)
    uni = ", ".join(f"{k} {v:.3f}" for k, v in m["unimodal_accuracy"].items())
    print(f"evaluate: {args.split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, ECE {m['ece']:.3f}, "
          f"heads: {uni}; linear probes: {_probes(m)} -> {os.path.join(args.run, 'eval_' + args.split + '.json')}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.engines import SWEEP_ENGINES, EngineOptions, make_engine
    from experiments.sweep import final_lines, load_sweep, plan_lines, plan_tasks, run_sweep

    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip()) if args.devices else ()
    options = EngineOptions(jobs=args.jobs, devices=devices, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                            ray_address=args.ray_address, slurm_partition=args.slurm_partition, slurm_time=args.slurm_time)
    SWEEP_ENGINES.get(args.engine).check_options(options)  # the flags first: no file read for a mistyped one
    sweep = load_sweep(args.config, out=args.out, shards=args.shards)
    engine = make_engine(args.engine, options, sweep)  # refuses what the engine cannot do, before anything is written
    if args.dry_run:
        lines, warnings = plan_lines(sweep, only=args.only)
        print("\n".join(lines))
        for line in engine.plan(plan_tasks(sweep, engine, only=args.only)):
            print(line)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        shown = f"{len(lines) - len(sweep.unsupported)} of {len(sweep.runs)} runs (--only {args.only})" if args.only else f"{len(sweep.runs)} runs"
        print(f"sweep: {shown}, {len(sweep.unsupported)} unsupported combinations; runs in {sweep.out}")
        return 0
    records = run_sweep(sweep, only=args.only, engine=engine)
    failed = [r for r in records.values() if r.get("status") == "failed"]
    done = sum(r.get("status") == "done" for r in records.values())
    elsewhere = sum(r.get("status") == "running" and "elsewhere" in r for r in records.values())
    held = f", {elsewhere} running elsewhere (not started here)" if elsewhere else ""
    print(f"sweep: {done}/{len(sweep.runs)} runs of the sweep finished, {len(failed)} failed{held}; status in "
          f"{os.path.join(sweep.out, 'sweep.json')}; report: {command('report')} --runs {sweep.out} --out REPORT_DIR")
    for line in final_lines(records):
        print(line)
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from experiments import tables
    from experiments.report import write_report

    if args.check:  # do re-run runs repeat a saved summary's numbers?
        from experiments.reproduce import compare

        if not args.summary or args.runs or args.out or args.markdown:
            raise UserError("--check RUNS compares re-run runs with a saved summary: use it with --summary FILE alone")
        lines, problems = compare(tables.load_summary(args.summary), args.check, args.tolerance)
        print("\n".join(lines))
        if problems:
            raise UserError(f"{len(problems)} number(s) differ from {args.summary}" if lines else problems[0])
        print(f"check: every number of the {len(lines)} run(s) under {args.check} is as in {args.summary}")
        return 0
    if args.summary:  # tables from a saved summary, no runs needed
        if args.runs or args.out or not args.markdown:
            raise UserError("--summary FILE prints the study tables of a saved summary.json: use it with --markdown "
                            "and without --runs/--out")
        print(tables.markdown(tables.load_summary(args.summary)), end="")
        return 0
    if not args.runs or not args.out:
        raise UserError("report needs --runs DIR and --out DIR (or --summary FILE --markdown for the tables of a saved report)")
    path = write_report(args.runs, args.out)
    summary = tables.load_summary(os.path.join(args.out, "summary.json"))
    print(f"report: {path}")
    if args.markdown:
        print(tables.markdown(summary), end="")
    else:
        print("\n".join(tables.short_lines(summary)))
    return 0


def add_preprocess_options(p: argparse.ArgumentParser, default_split: str, default_stages: tuple[str, ...]) -> None:
    """The options every ``preprocess CORPUS`` shares (stages, workers, faces, audio, pack)."""
    from pipelines.stages.onnx_backend import BACKENDS  # light: no torch, no onnxruntime

    p.add_argument("--out", required=True, help="output folder or fsspec URL (file://, s3://, gs://): manifest/, cache/, "
                   "shards/<split>/, status.jsonl; with --engine ray on several nodes, storage every node sees")
    p.add_argument("--split", default=default_split, help=f"comma-separated split names to pack (the manifest summary lists them) (default {default_split})")
    p.add_argument("--stages", default=",".join(default_stages),
                   help=f"comma-separated subset of frames,flow,faces,face_features,audio,pack (default {','.join(default_stages)})")
    p.add_argument("--workers", type=arg(int, Allowed(lo=1)), default=1,
                   help="worker processes (default 1); with --engine ray, the CPUs of a local runtime and the face actors")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="where the work runs: local (a process pool) or ray (tasks and actors on a Ray cluster) (default local)")
    p.add_argument("--ray-address", help="--engine ray: a running cluster, auto or HOST:PORT (default: start a local runtime sized by --workers)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for MTCNN and EfficientNet (default cpu)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="inference backend of the face networks (MTCNN, EfficientNet-B2): torch, or onnx (ONNX Runtime, "
                        "CPU only; exported from the same weights once and cached, docs/preprocessing.md 'Face backends'); auto: onnx "
                        "on CPU when onnxruntime is installed, else torch (default auto)")
    p.add_argument("--batch-size", type=arg(int, Allowed(lo=1)), default=32, help="face frames per MTCNN/EfficientNet batch (default 32)")
    p.add_argument("--face-fps", type=arg(float, Allowed(lo=0, lo_open=True)), default=None, help="face frames per second, > 0 (default: every frame)")
    p.add_argument("--face-detect-fps", type=arg(float, Allowed(lo=0, lo_open=True)), default=None,
                   help="detect faces at this rate and carry boxes in between (default: detect on every face frame)")
    p.add_argument("--face-detect-scale", type=arg(float, Allowed(lo=0, hi=1, lo_open=True)), default=1.0,
                   help="detect faces on the frame resized by this factor, 0-1, for large faces; --face-min-size then "
                        "counts the resized frame's pixels (default 1: full size)")
    p.add_argument("--face-min-size", type=arg(int, Allowed(lo=1)), default=40, help="MTCNN minimum face size in pixels (default 40)")
    p.add_argument("--face-margin", type=arg(float, Allowed(lo=0)), default=0.2, help="crop side = max(w, h) x (1 + margin) (default 0.2)")
    p.add_argument("--face-size", type=int, choices=(260, 224), default=260, help="face crop size: 260 (EfficientNet-B2) or 224 (default 260)")
    p.add_argument("--face-weights", help="EfficientNet-B2 weights: a timm state dict (.pth or .safetensors) or a "
                   "Hugging Face model id (hf-hub:timm/efficientnet_b2.ra_in1k), downloaded once into the HF cache "
                   "(default: none; then --allow-random-weights is needed)")
    p.add_argument("--allow-random-weights", action="store_true", help="tests/demos only: seeded random EfficientNet-B2 weights")
    p.add_argument("--keep-face-crops", action="store_true", help="also store the face crops (faces.jpg)")
    p.add_argument("--flow-rate", type=arg(float, Allowed(lo=0, lo_open=True)), default=1.0,
                   help="optical-flow slots per second, > 0; slot n starts at the frame on screen at n/rate s (default 1.0: one per 1-fps frame)")
    p.add_argument("--flow-stack", type=arg(int, Allowed(lo=1)), default=1,
                   help="consecutive flow fields per slot, >= 1 (two-stream networks stack 10) (default 1)")
    p.add_argument("--flow-bound", type=arg(float, Allowed(lo=0, lo_open=True)), default=20.0,
                   help="flow is clipped to +-bound pixels before quantising to 0..255, > 0 (default 20)")
    p.add_argument("--flow-preset", choices=("ultrafast", "fast", "medium"), default="medium",
                   help="OpenCV DIS optical-flow preset (default medium)")
    p.add_argument("--spec", choices=("logmel", "linear"), default="logmel", help="spectrogram: 128-bin log-Mel or the reference linear 257 x 188 (default logmel)")
    p.add_argument("--spec-seconds", type=arg(float, Allowed(lo=0, lo_open=True)), default=None,
                   help="seconds the spectrogram covers, shorter clips tiled (default: the corpus', 3 for CREMA-D as the "
                        "reference, 10 for AVE; docs/recipes.md)")
    p.add_argument("--shard-samples", type=arg(int, Allowed(lo=1)), default=None,
                   help="samples per shard (default: as many as fill --shard-mb, at most part size / --min-shards, at least 8)")
    p.add_argument("--shard-mb", type=arg(float, Allowed(lo=1)), default=256.0,
                   help="target shard size in MB when --shard-samples is not given (default 256: webdataset's 100 MB - 1 GB for streaming)")
    p.add_argument("--min-shards", type=arg(int, Allowed(lo=1)), default=16,
                   help="shards per part at least, for parts large enough (default 16; raise it to ranks x loader workers of a cluster)")
    p.add_argument("--overwrite", action="store_true", help="drop cached stage outputs and shards, redo everything")


def corpus_parsers(sub, command: str, help_text: str):
    """``cli.py COMMAND CORPUS``: one sub-parser per registered recipe, each with its ``--root``."""
    from pipelines.recipes import get_recipe, recipe_names

    p = sub.add_parser(command, help=help_text)
    corpora = p.add_subparsers(dest="corpus", metavar="CORPUS", required=True,
                               help=f"the corpus recipe: {', '.join(recipe_names())} (docs/recipes.md)")
    for name in recipe_names():
        recipe = get_recipe(name)
        q = corpora.add_parser(name, help=recipe.description, description=recipe.description)
        q.add_argument("--root", required=True, help=recipe.root_help)
        yield recipe, q


def config_keys_text() -> str:
    """The config keys for ``train --help``, from the run config's dataclasses (trainer/run_config.py)."""
    from trainer.run_config import settings_help

    lines = ["config keys, KEY=DEFAULT: what it allows; meaning (--set KEY=VALUE, or nested in a --config file):"]
    for key, text in settings_help():
        lines.append(textwrap.fill(f"{key}: {text}", width=100, initial_indent="  ", subsequent_indent="      ",
                                   break_long_words=False, break_on_hyphens=False))
    return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are the same one-paragraph ``error:`` as every other refusal
    (no usage dump; the command's ``--help`` is named). Subcommand parsers inherit it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(error_text(f"{self.prog}: {message}; see `{self.prog} --help`"), file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog(),
        description="avbalance: audio-visual datasets to WebDataset shards, and modality-balanced training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="write a CREMA-D-shaped synthetic corpus")
    p.add_argument("corpus", choices=CORPORA, help="the corpus recipe (cremad)")
    p.add_argument("--out", required=True, help="output folder (gets VideoFlash/ and AudioWAV/)")
    p.add_argument("--actors", type=arg(int, Allowed(lo=1, hi=91)), default=6,
                   help="number of actors, half male, half female, 1-91 (default 6)")
    p.add_argument("--sentences", type=arg(int, Allowed(lo=1, hi=12)), default=4, help="sentences per actor, 1-12 (default 4)")
    p.add_argument("--seed", type=arg(int, Allowed(lo=0)), default=0, help="random seed of the corpus (default 0)")
    p.add_argument("--audio-signal", type=arg(float, Allowed(lo=0, hi=3)), default=1.0, help="strength of the emotion cue in the voice, 0 = none, up to 3 (default 1.0)")
    p.add_argument("--video-signal", type=arg(float, Allowed(lo=0, hi=3)), default=0.6, help="strength of the emotion cue on the face, 0 = none, up to 3 (default 0.6)")
    p.add_argument("--audio-clear", type=arg(float, Allowed(lo=0, hi=1)), default=1.0,
                   help="share of clips whose voice shows the emotion at full strength, 0-1; the others carry a faint cue, "
                        "drawn independently of the face (default 1.0)")
    p.add_argument("--video-clear", type=arg(float, Allowed(lo=0, hi=1)), default=1.0,
                   help="share of clips whose face shows the emotion at full strength, 0-1, independent of the voice (default 1.0)")
    p.add_argument("--workers", type=arg(int, Allowed(lo=1)), default=min(2, os.cpu_count() or 1),
                   help=f"worker processes (default {min(2, os.cpu_count() or 1)}: up to 2, one per CPU core)")
    p.set_defaults(func=cmd_synth)

    for recipe, q in corpus_parsers(sub, "manifest", "index a corpus: clip manifest, metadata and splits"):
        q.add_argument("--out", required=True, help="manifest folder (clips.jsonl, skipped.jsonl, summary.json)")
        recipe.add_arguments(q)
        q.set_defaults(func=cmd_manifest)

    for recipe, q in corpus_parsers(sub, "preprocess", "decode, frames, optical flow, faces, face features, audio, pack into WebDataset shards"):
        add_preprocess_options(q, recipe.default_split, recipe.default_stages)
        recipe.add_arguments(q)
        q.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("verify-shards", help="check a shard set against its shards.json (sizes; sha256 with --hash)")
    p.add_argument("dir", metavar="DIR|URL", help="shard set folder (holds shards.json), e.g. OUT/shards/ogm, or its URL "
                   "(http(s)://, s3://, gs://, file://, pipe:CMD with {name})")
    p.add_argument("--hash", action="store_true", help="also compare every shard's sha256 (reads every byte; default: sizes only)")
    p.set_defaults(func=cmd_verify_shards)

    p = sub.add_parser("export", help="export a shard set to another format (h5)")
    p.add_argument("format", choices=("h5",), help="output format: h5 (one HDF5 file, layout in pipelines/export_h5.py)")
    p.add_argument("--shards", required=True, metavar="DIR", help="shard set folder (holds shards.json), e.g. OUT/shards/ogm")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, e.g. ogm.h5 (written to OUT.tmp, renamed when complete)")
    p.add_argument("--parts", metavar="LIST", help="comma-separated parts to export, e.g. train,test (default: all in the index)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="train a multimodal classifier from shards (torchrun for several processes)",
                       epilog=config_keys_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML config, or a shipped preset by name (resnet_small, resnet_mlb, ...: trainer/configs/NAME.yaml); built-in defaults apply where it is silent "
                   "(default: none, all built-in defaults; with --resume: the run's own config)")
    p.add_argument("--shards", required=True, metavar="DIR|URL", help="a shard set folder with shards.json (OUT/shards/<split>), "
                   "or its URL: http(s)://, s3://, gs://, file://, or pipe:CMD with {name} for the file name (streamed)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, tb/, best.pt, last.pt")
    p.add_argument("--set", action="append", nargs="+", metavar="KEY=VALUE",
                   help="override a config key, e.g. optim.lr=1e-4; every key, its default and what it allows "
                        "are listed below (repeatable; default: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the run's own config.yaml")
    p.add_argument("--shard-cache", metavar="DIR", help="keep remote shards read to their end in DIR and read them from there "
                   "afterwards (default: none, always streamed)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained run: accuracy, macro-F1, heads, ECE, agreement, confusion")
    p.add_argument("--run", required=True, help="a run folder written by train")
    p.add_argument("--split", default="test", help="the part to evaluate: train, val or test (default test)")
    p.add_argument("--shards", metavar="DIR|URL", help="evaluate on another shard set (folder or URL) than the run's (default: the run's own)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="best.pt (best validation accuracy) or last.pt (the last epoch) (default best)")
    p.add_argument("--shard-cache", metavar="DIR", help="keep remote shards read to their end in DIR and read them from there "
                   "afterwards (default: none, always streamed)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="run a grid of training runs (methods x fusions x presets x splits x seeds) from one YAML file")
    p.add_argument("--config", required=True, help="sweep file, e.g. experiments/sweeps/cremad_paper.yaml")
    p.add_argument("--out", help="folder for the runs (default: the file's `out`)")
    p.add_argument("--shards", metavar="TEMPLATE", help="shard folder per split, with {split} and optionally {block} (the "
                   "block's name), e.g. demo/pre/shards/{split} (default: the file's `shards`; a block's own `shards` still wins)")
    p.add_argument("--engine", choices=("local", "ray", "slurm"), default="local",
                   help="where each run's train process runs: local (subprocesses of this machine), ray (a Ray task per "
                        "run) or slurm (a Slurm job per run, through submitit) (default local)")
    p.add_argument("--jobs", type=arg(int, Allowed(lo=1)), help="runs at a time (default 1); threads are split between them; "
                   "with --engine ray, a local Ray runtime of jobs x --cpus-per-run CPUs (default: every CPU)")
    p.add_argument("--devices", help="--engine local: comma-separated GPU ids, one per parallel run in turn, e.g. 0,1,2,3 "
                   "(default: none)")
    p.add_argument("--cpus-per-run", type=arg(int, Allowed(lo=1)), metavar="N",
                   help="--engine ray or slurm: CPUs each run holds, and its threads (default 1)")
    p.add_argument("--gpus-per-run", type=arg(int, Allowed(lo=0)), metavar="N",
                   help="--engine ray or slurm: GPUs each run holds; above 0 the runs train with train.device=cuda, at 0 "
                        "with train.device=cpu (default 0)")
    p.add_argument("--ray-address", metavar="auto|HOST:PORT", help="--engine ray: a running cluster, whose nodes all see "
                   "the absolute --out (default: a local runtime started and stopped by the sweep)")
    p.add_argument("--slurm-partition", metavar="NAME", help="--engine slurm: the partition of the jobs (default: the "
                   "cluster's default partition)")
    p.add_argument("--slurm-time", type=arg(int, Allowed(lo=1)), metavar="MINUTES",
                   help="--engine slurm: each job's time limit; a job that reaches it is requeued and resumes from its "
                        "last.pt (default: the partition's limit)")
    p.add_argument("--only", metavar="GLOB", help="run only the runs whose id matches, e.g. 'resnet_ogm/mlb-*'; several globs "
                   "separated by commas keep a run matching any (default: all)")
    p.add_argument("--dry-run", action="store_true", help="list every run and its state (new, resume, done, or running: "
                   "held by another live process), and with --engine ray or slurm what would be started or submitted "
                   "(resources, each run's command), and stop")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="draw the comparison report (report.html and PNGs) from a folder of runs")
    p.add_argument("--runs", help="a folder holding run folders (searched recursively), e.g. a sweep's out "
                   "(no default: needed unless --summary is given)")
    p.add_argument("--out", help="report folder: report.html, the PNGs and summary.json (no default: needed with --runs)")
    p.add_argument("--markdown", action="store_true", help="print the study tables as GitHub markdown")
    p.add_argument("--summary", metavar="FILE", help="with --markdown: print the tables of a saved summary.json, no runs needed (default: none)")
    p.add_argument("--check", metavar="RUNS", help="with --summary: compare the finished runs under RUNS that the summary "
                   "lists (same id) with its numbers, exit 2 when one differs (e.g. one seed re-run with `make "
                   "study-check`) (default: none)")
    p.add_argument("--tolerance", type=arg(float, Allowed(lo=0.0)), default=0.0, metavar="X",
                   help="with --check: the largest difference allowed, as a fraction (0.01 = 1 point) (default 0: exact)")
    p.set_defaults(func=cmd_report)
    return parser


def error_text(message: str) -> str:
    """``error: ...`` wrapped at spaces only: a flag, path or value is never split (copy-paste)."""
    return textwrap.fill("error: " + message, width=100, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def continue_command(argv: list[str], args: argparse.Namespace) -> str:
    """The command that continues after Ctrl-C: ``train`` needs ``--resume`` once a checkpoint exists."""
    cmd = [*shlex.split(prog()), *argv]
    if args.command == "train" and not args.resume and os.path.exists(os.path.join(args.out, "last.pt")):
        cmd.append("--resume")
    return shlex.join(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault(PROG_ENV, detect())  # the spelling every suggested command uses, here and in children
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(error_text(str(err)), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"interrupted: finished work is kept; to continue, run: {continue_command(argv, args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
