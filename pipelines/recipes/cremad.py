"""CREMA-D recipe: ``prepare_cremad`` builds the manifest; ``synth_cremad`` makes a corpus."""

from __future__ import annotations

import argparse
import os
import time

from avbalance.progress import progress_bar
from manifests import metadata
from manifests.cremad import MANIFEST_VERSION, assign_splits, ensure_usable, scan_corpus
from manifests.io import split_summary, write_manifest
from manifests.schema import EMOTIONS, MODALITY_DIRS
from manifests.verify import total_bytes, verify_clips
from pipelines.recipes.base import RECIPES, Recipe


def prepare_cremad(
    root: str,
    out: str,
    verify: bool = False,
    checksums: str | None = None,
    kfold: int = 3,
    kfold_seed: int = 0,
) -> dict:
    """Scan ``root``, join metadata, assign splits, optionally verify checksums, write to ``out``.

    Returns the summary (also written as ``out/summary.json``).
    """
    started = time.time()
    n_files = sum(
        len(os.listdir(os.path.join(root, folder)))
        for folder, _ in MODALITY_DIRS.values()
        if os.path.isdir(os.path.join(root, folder))
    ) if os.path.isdir(root) else 0
    with progress_bar(n_files, "scan", unit="file") as bar:
        scan = scan_corpus(root, progress=bar.update)
    clips, skipped = scan.clips, list(scan.skipped)

    verify_report = None
    if verify:
        official = metadata.read_checksum_file(checksums) if checksums else metadata.official_media()
        with progress_bar(total_bytes(root, clips), "verify", unit="B", unit_scale=True) as bar:
            clips, failed, verify_report = verify_clips(root, clips, official, progress=bar.update)
        skipped += failed
        ensure_usable(root, clips, skipped)
        verify_report["checksums"] = checksums or "manifests/cremad/media_lfs.csv.gz (official)"

    split_names = assign_splits(clips, k=kfold, seed=kfold_seed)
    for clip in clips:  # the generic schema's label name (manifests/record.py)
        clip["label_name"] = clip["emotion"]
    summary = {
        "manifest_version": MANIFEST_VERSION,
        "corpus": "cremad",
        "classes": list(EMOTIONS),
        "root": os.path.abspath(root),
        "clips": len(clips),
        "actors": len({c["actor"] for c in clips}),
        "files_seen": scan.files_seen,
        "skipped_files": len(skipped),
        "skipped_by_reason": _count_reasons(skipped),
        "audio_from_video_track": sum("wav" not in c["files"] for c in clips),
        "kfold": {"k": kfold, "seed": kfold_seed},
        "splits": split_summary(clips, split_names, EMOTIONS, class_key="emotion", group_key="actor", group_word="actors"),
        "verify": verify_report,
        "seconds": round(time.time() - started, 2),
    }
    write_manifest(out, clips, skipped, summary)
    return summary


def _count_reasons(skipped: list[dict]) -> dict[str, int]:
    """Group reasons by their first clause, so the summary stays short."""
    counts: dict[str, int] = {}
    for s in skipped:
        key = s["reason"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


@RECIPES.register("cremad")
class Cremad(Recipe):
    """CREMA-D as cloned from CheyneyComputerScience/CREMA-D (VideoFlash/, AudioWAV/)."""

    description = "CREMA-D: VideoFlash/*.flv + AudioWAV/*.wav, 6 emotions; splits ogm, vavl1..5, kfold1..K"
    root_help = "corpus folder (holds VideoFlash/, AudioWAV/, AudioMP3/)"
    default_split = "ogm"
    clip_seconds = 2.5  # mean length; clips run 1-5 s

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from avbalance.ranges import Allowed, arg

        parser.add_argument("--verify", action="store_true", help="check every file's size and sha256 against the official list")
        parser.add_argument("--checksums", help="a path,sha256,size CSV to verify against instead of the official list "
                            "(default: the official list)")
        parser.add_argument("--kfold", type=arg(int, Allowed(lo=2)), default=3, help="number of actor-disjoint folds, >= 2 (default 3)")
        parser.add_argument("--kfold-seed", type=arg(int, Allowed(lo=0)), default=0,
                            help="seed of the actor shuffle behind the folds (default 0)")

    def prepare(self, root: str, out: str) -> dict:
        o = self.options
        return prepare_cremad(root, out, verify=o.get("verify", False), checksums=o.get("checksums"),
                              kfold=o.get("kfold", 3), kfold_seed=o.get("kfold_seed", 0))

    def named_clips(self, split: str, clips: list[dict], skipped: list[dict]) -> dict[str, str]:
        from pipelines.coverage import named_clips

        return named_clips(split, clips, skipped)

    def sample_meta(self, clip: dict) -> dict:
        keep = ("clip_id", "actor", "sentence", "sentence_text", "emotion", "emotion_name", "label", "level", "demographics", "votes")
        return {k: clip[k] for k in keep}
