"""Build the CREMA-D clip manifest: scan a corpus tree, check every file, join metadata.

Every clip with a usable video becomes one record. Every file that cannot be used is kept
in ``skipped`` with its reason; a bad file never takes its neighbours down with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from avbalance.errors import UserError
from avbalance.invocation import prog
from manifests import metadata
from manifests.probe import LFS_FIX, Probe, probe_file
from manifests.schema import EMOTION_NAMES, MODALITY_DIRS, SENTENCES, parse_clip_name
from manifests.splits import VAVL_SPLITS, kfold_actor_split, ogm_split, vavl_split

MANIFEST_VERSION = 2  # 2: a truncated FLV with video before the cut is kept (probe note "truncated")


@dataclass
class ScanResult:
    clips: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    files_seen: int = 0


def _list_media(root: str) -> dict[str, list[str]]:
    """Modality -> sorted file names found in that modality's folder."""
    found: dict[str, list[str]] = {}
    for modality, (folder, _) in MODALITY_DIRS.items():
        path = os.path.join(root, folder)
        if os.path.isdir(path):
            found[modality] = sorted(
                n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n))
            )
    return found


def check_root(root: str) -> dict[str, list[str]]:
    """Refuse roots that cannot hold a corpus, with a message that says what to do."""
    if not os.path.exists(root):
        raise UserError(f"corpus root {root} does not exist; pass --root with the folder that holds VideoFlash/ and AudioWAV/")
    if not os.path.isdir(root):
        raise UserError(f"corpus root {root} is a file, not a folder; pass the folder that holds VideoFlash/ and AudioWAV/")
    media = _list_media(root)
    if "video" not in media and "wav" not in media:
        raise UserError(
            f"{root} has no VideoFlash/ or AudioWAV/ folder: is it a CREMA-D copy? "
            "Clone it with `git lfs clone https://github.com/CheyneyComputerScience/CREMA-D` "
            f"and pass that folder, or make a synthetic one with `{prog()} synth cremad --out DIR`."
        )
    if not any(media.values()):
        raise UserError(f"{root} has the CREMA-D folders but they are empty: nothing to index")
    return media


def scan_corpus(root: str, progress: Callable[[int], None] | None = None) -> ScanResult:
    """Pair each clip's files, probe them, and split usable clips from skipped files."""
    media = check_root(root)
    result = ScanResult()
    per_clip: dict[str, dict[str, tuple[str, Probe]]] = {}
    for modality, names in media.items():
        folder, ext = MODALITY_DIRS[modality]
        for name in names:
            result.files_seen += 1
            rel = f"{folder}/{name}"
            stem, got_ext = os.path.splitext(name)
            if got_ext.lower() != ext:
                result.skipped.append({"path": rel, "reason": f"unexpected file type {got_ext or '(none)'} in {folder}/ (expected {ext})"})
            else:
                try:
                    parse_clip_name(stem)
                except ValueError as err:
                    result.skipped.append({"path": rel, "reason": f"name outside the CREMA-D scheme: {err}"})
                else:
                    probe = probe_file(os.path.join(root, rel))
                    if probe.problem:
                        result.skipped.append({"path": rel, "reason": probe.problem})
                    else:
                        per_clip.setdefault(stem, {})[modality] = (rel, probe)
            if progress:
                progress(1)

    skipped_paths = {s["path"] for s in result.skipped}
    for stem in sorted(per_clip):
        files = per_clip[stem]
        if "video" not in files:
            folder, ext = MODALITY_DIRS["video"]
            why = "unusable (see its own entry)" if f"{folder}/{stem}{ext}" in skipped_paths else "missing"
            for rel, _ in files.values():
                result.skipped.append({"path": rel, "reason": f"clip has no usable video: {folder}/{stem}{ext} is {why}"})
            continue
        result.clips.append(clip_record(stem, files))
    ensure_usable(root, result.clips, result.skipped)
    return result


def clip_record(stem: str, files: dict[str, tuple[str, Probe]]) -> dict:
    """One manifest line: names, label, media paths and what the probe learned, metadata."""
    name = parse_clip_name(stem)
    votes = metadata.crowd_votes().get(stem, {})
    record = {
        "clip_id": stem,
        "actor": name.actor,
        "sentence": name.sentence,
        "sentence_text": SENTENCES[name.sentence],
        "emotion": name.emotion,
        "emotion_name": EMOTION_NAMES[name.emotion],
        "label": name.label,
        "level": name.level,
        "stimulus": metadata.stimulus_numbers().get(stem),
        "demographics": metadata.demographics().get(name.actor),
        "votes": {
            modality: {"emotions": list(v.emotions), "levels": list(v.levels), "correct": v.correct(name.emotion)}
            for modality, v in votes.items()
        },
        "files": {m: rel for m, (rel, _) in sorted(files.items())},
        "bytes": {m: probe.size for m, (_, probe) in sorted(files.items())},
        "probe": {m: probe.info for m, (_, probe) in sorted(files.items()) if probe.info},
        "splits": {},
    }
    return record


def ensure_usable(root: str, clips: list[dict], skipped: list[dict]) -> None:
    """Raise a UserError that explains the commonest cause when no clip is usable."""
    if clips:
        return
    reasons = [s["reason"] for s in skipped]
    lfs = sum("Git LFS pointer" in r for r in reasons)
    if lfs and lfs >= len(reasons) // 2:
        raise UserError(
            f"{root} holds Git LFS pointer files instead of media ({lfs} of {len(reasons)} files are "
            f"~130-byte text pointers): the repository was cloned or downloaded without git-lfs. "
            f"To fix it, {LFS_FIX}. Nothing was indexed."
        )
    examples = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
    raise UserError(
        f"no usable clip under {root}: {len(skipped)} file(s) skipped, e.g. {examples}"
        if skipped else f"no usable clip under {root}"
    )


def assign_splits(clips: list[dict], k: int = 3, seed: int = 0, val_fraction: float = 0.15) -> list[str]:
    """Fill each record's ``splits`` (split name -> train|val|test); return the split names.

    A clip absent from a published list has no entry for that split (e.g. the 1,622 clips
    outside VAVL's consensus subset). ``kfold`` is computed over the actors present.
    """
    ogm = ogm_split()
    vavl = {name: vavl_split(i + 1) for i, name in enumerate(VAVL_SPLITS)}
    demo = metadata.demographics()
    actors = sorted({c["actor"] for c in clips})
    names = ["ogm", *VAVL_SPLITS]
    folds: list[dict[int, str]] = []
    if len(actors) >= k + 2:
        sexes = {a: str(demo.get(a, {}).get("sex", "unknown")) for a in actors}
        folds = kfold_actor_split(actors, sexes, k=k, seed=seed, val_fraction=val_fraction)
        names += [f"kfold{i + 1}" for i in range(k)]
    for clip in clips:
        cid = clip["clip_id"]
        splits = {}
        if cid in ogm:
            splits["ogm"] = ogm[cid]
        for name, table in vavl.items():
            if cid in table:
                splits[name] = table[cid]
        for i, fold in enumerate(folds):
            splits[f"kfold{i + 1}"] = fold[clip["actor"]]
        clip["splits"] = splits
    return names
