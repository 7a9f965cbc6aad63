"""CREMA-D recipe: ``prepare_cremad`` builds the manifest; ``synth_cremad`` makes a corpus."""

from __future__ import annotations

import os
import time

from avbalance.progress import progress_bar
from manifests import metadata
from manifests.cremad import MANIFEST_VERSION, assign_splits, ensure_usable, scan_corpus
from manifests.io import split_summary, write_manifest
from manifests.schema import MODALITY_DIRS
from manifests.verify import total_bytes, verify_clips


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
    summary = {
        "manifest_version": MANIFEST_VERSION,
        "corpus": "cremad",
        "root": os.path.abspath(root),
        "clips": len(clips),
        "actors": len({c["actor"] for c in clips}),
        "files_seen": scan.files_seen,
        "skipped_files": len(skipped),
        "skipped_by_reason": _count_reasons(skipped),
        "audio_from_video_track": sum("wav" not in c["files"] for c in clips),
        "kfold": {"k": kfold, "seed": kfold_seed},
        "splits": split_summary(clips, split_names),
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
