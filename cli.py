#!/usr/bin/env python3
"""avbalance command line: thin wrappers that parse arguments and call library functions.

    python cli.py synth cremad --out DIR
    python cli.py manifest cremad --root DIR --out DIR [--verify]
    python cli.py preprocess cremad --root DIR --out DIR
    python cli.py train --config FILE --shards DIR --out RUN_DIR
    python cli.py evaluate --run RUN_DIR [--split test]
    python cli.py sweep --config FILE
    python cli.py report --runs DIR --out DIR
    python cli.py export h5 --shards DIR --out FILE.h5

Bad input ends with a one-paragraph message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from avbalance.errors import UserError  # noqa: E402

CORPORA = ("cremad",)


def cmd_synth(args: argparse.Namespace) -> int:
    from pipelines.synth.cremad import SynthConfig, synth_cremad

    cfg = SynthConfig(
        out=args.out, actors=args.actors, sentences=args.sentences, seed=args.seed,
        audio_signal=args.audio_signal, video_signal=args.video_signal, workers=args.workers,
    )
    summary = synth_cremad(cfg)
    print(f"synth: wrote {summary['clips']} clips from {len(summary['actors'])} actors to {args.out}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from pipelines.recipes.cremad import prepare_cremad

    summary = prepare_cremad(
        args.root, args.out, verify=args.verify, checksums=args.checksums,
        kfold=args.kfold, kfold_seed=args.kfold_seed,
    )
    print(f"manifest: {summary['clips']} clips, {summary['actors']} actors -> {os.path.join(args.out, 'clips.jsonl')}")
    for split, parts in summary["splits"].items():
        if parts:
            counts = ", ".join(f"{p} {v['clips']} clips/{v['actors']} actors" for p, v in parts.items())
            print(f"  {split:7s} {counts}")
    if summary["verify"]:
        v = summary["verify"]
        print(f"verify: {v['files_checked']} files checked, {v['files_failed']} failed, "
              f"{v['official_missing']} official files not present")
    if summary["skipped_files"]:
        print(f"skipped {summary['skipped_files']} file(s), reasons in {os.path.join(args.out, 'skipped.jsonl')}:")
        for reason, n in summary["skipped_by_reason"].items():
            print(f"  {n:6d}  {reason}")
    return 0


def cmd_not_yet(args: argparse.Namespace) -> int:
    raise UserError(f"`{args.command}` is not implemented yet in this version of avbalance.", exit_code=3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py",
        description="avbalance: audio-visual datasets to WebDataset shards, and modality-balanced training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="write a CREMA-D-shaped synthetic corpus")
    p.add_argument("corpus", choices=CORPORA)
    p.add_argument("--out", required=True, help="output folder (gets VideoFlash/ and AudioWAV/)")
    p.add_argument("--actors", type=int, default=6, help="number of actors, half male, half female (default 6)")
    p.add_argument("--sentences", type=int, default=4, help="sentences per actor, 1-12 (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--audio-signal", type=float, default=1.0, help="strength of the emotion cue in the voice, 0 = none (default 1.0)")
    p.add_argument("--video-signal", type=float, default=0.6, help="strength of the emotion cue on the face, 0 = none (default 0.6)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("manifest", help="index a corpus: clip manifest, metadata and splits")
    p.add_argument("corpus", choices=CORPORA)
    p.add_argument("--root", required=True, help="corpus folder (holds VideoFlash/, AudioWAV/, AudioMP3/)")
    p.add_argument("--out", required=True, help="manifest folder (clips.jsonl, skipped.jsonl, summary.json)")
    p.add_argument("--verify", action="store_true", help="check every file's size and sha256 against the official list")
    p.add_argument("--checksums", help="a path,sha256,size CSV to verify against instead of the official list")
    p.add_argument("--kfold", type=int, default=3, help="number of actor-disjoint folds (default 3)")
    p.add_argument("--kfold-seed", type=int, default=0)
    p.set_defaults(func=cmd_manifest)

    for name, text in [
        ("preprocess", "decode, frames, faces, face features, audio, pack into WebDataset shards"),
        ("train", "train a multimodal classifier from shards"),
        ("evaluate", "evaluate a trained run"),
        ("sweep", "run a grid of training runs from one YAML file"),
        ("report", "draw the comparison report from a folder of runs"),
        ("export", "export shards to another format (h5)"),
    ]:
        p = sub.add_parser(name, help=text + " (not implemented yet)", description=text)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=cmd_not_yet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print("error: " + textwrap.fill(str(err), width=100, subsequent_indent="  "), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to continue.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
