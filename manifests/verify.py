"""``--verify``: compare every indexed file's size and sha256 with the official list."""

from __future__ import annotations

import hashlib
import os
from typing import Callable

from manifests.metadata import OfficialFile


def sha256_of(path: str, progress: Callable[[int], None] | None = None, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def verify_clips(
    root: str,
    clips: list[dict],
    official: dict[str, OfficialFile],
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """Split clips into (kept, skipped files) by checksum; also report official files not present.

    A clip whose video fails is dropped with all its files listed; a clip whose audio
    file fails keeps its video and loses only that file (its audio then comes from the
    video's own track), so a bad file never costs more than it must.
    """
    kept: list[dict] = []
    skipped: list[dict] = []
    checked = 0
    for clip in clips:
        bad: dict[str, str] = {}
        for modality, rel in clip["files"].items():
            checked += 1
            expected = official.get(rel)
            path = os.path.join(root, rel)
            if expected is None:
                bad[modality] = "not in the official file list"
                if progress:
                    progress(os.path.getsize(path))
                continue
            size = os.path.getsize(path)
            if size != expected.size:
                bad[modality] = f"size {size} differs from the official {expected.size} bytes"
                if progress:
                    progress(size)
                continue
            digest = sha256_of(path, progress)
            if digest != expected.sha256:
                bad[modality] = f"sha256 {digest[:12]}… differs from the official {expected.sha256[:12]}…"
        if "video" in bad:
            for modality, rel in clip["files"].items():
                reason = bad.get(modality, f"clip dropped: its video failed verification ({bad['video']})")
                skipped.append({"path": rel, "reason": f"verify: {reason}"})
            continue
        for modality, reason in bad.items():
            skipped.append({"path": clip["files"].pop(modality), "reason": f"verify: {reason}"})
            clip["bytes"].pop(modality, None)
            clip["probe"].pop(modality, None)
        kept.append(clip)
    present = {rel for clip in clips for rel in clip["files"].values()} | {s["path"] for s in skipped}
    missing = sorted(rel for rel in official if rel not in present)
    report = {"files_checked": checked, "files_failed": len(skipped), "official_missing": len(missing), "official_missing_examples": missing[:10]}
    return kept, skipped, report


def total_bytes(root: str, clips: list[dict]) -> int:
    return sum(os.path.getsize(os.path.join(root, rel)) for c in clips for rel in c["files"].values())
