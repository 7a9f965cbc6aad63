"""VGGSound (Chen et al., ICASSP 2020): 10 s YouTube clips, 309 classes, the published
train/test split of ``vggsound.csv`` (rows ``youtube_id,start_seconds,label,split``; CC BY
4.0, from hche11/VGGSound). The CSV is read from the user's copy: the repository's own copy
is a large file we could not obtain to ship. Clips are the files the user downloaded
(``pipelines/recipes/_youtube.py`` lists the names recognised); the ones that are gone are
reported per part with counts, not errors.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

from avbalance.errors import UserError
from manifests.io import write_manifest
from pipelines.recipes._youtube import ListedClip, build_manifest, summarise
from pipelines.recipes.base import RECIPES, Recipe

CSV_SOURCE = "https://www.robots.ox.ac.uk/~vgg/data/vggsound/ (or data/vggsound.csv in github.com/hche11/VGGSound)"
CLIP_SECONDS = 10.0


def read_vggsound_csv(path: str) -> list[ListedClip]:
    """The rows of ``vggsound.csv``; a malformed row is a clear error naming its line."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh), 1):
            if not row or (n == 1 and not row[1].strip().isdigit()):
                continue  # blank line, or a header some copies carry
            if len(row) != 4 or not row[1].strip().isdigit() or row[3].strip() not in ("train", "test"):
                raise UserError(f"{path} line {n} is not `youtube_id,start_seconds,label,train|test` "
                                f"(got {','.join(row)!r}): is this VGGSound's vggsound.csv?")
            rows.append(ListedClip(row[0].strip(), int(row[1]), row[2].strip(), row[3].strip()))
    if not rows:
        raise UserError(f"{path} lists no clip: is this VGGSound's vggsound.csv?")
    return rows


@RECIPES.register("vggsound")
class VGGSound(Recipe):
    description = "VGGSound: downloaded 10 s YouTube clips + vggsound.csv (309 classes; split vggsound = its train/test)"
    root_help = "folder holding the downloaded clips (any depth), e.g. <ytid>_<start:06d>.mp4"
    default_split = "vggsound"
    clip_seconds = CLIP_SECONDS
    default_stages = ("frames", "audio", "pack")  # sound and scene; no face stages
    spec_seconds = CLIP_SECONDS  # the whole clip (OGM-GE's loader crops 5 s of it at random)
    # OGM-GE's VGGSound loader (dataset/VGGSoundDataset.py): a few frames drawn across the
    # clip; here 3, spread over it deterministically.
    train_defaults = {"data.frame_sampling": "spread"}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from avbalance.ranges import Allowed, arg

        parser.add_argument("--csv", help="VGGSound's vggsound.csv (default: ROOT/vggsound.csv)")
        parser.add_argument("--val-fraction", type=arg(float, Allowed(lo=0, hi=1, hi_open=True)), default=0.0,
                            help="share of the train videos held out as a val part, by YouTube id, 0 <= f < 1 "
                                 "(default 0: the published train/test only)")

    def prepare(self, root: str, out: str) -> dict:
        started = time.time()
        if not os.path.isdir(root):
            raise UserError(f"--root {root} is not a folder")
        path = self.options.get("csv") or os.path.join(root, "vggsound.csv")
        if not os.path.isfile(path):
            raise UserError(f"no VGGSound list at {path}: download vggsound.csv from {CSV_SOURCE} and put it in the "
                            "root or pass --csv PATH")
        listed = read_vggsound_csv(path)
        classes = sorted({r.label for r in listed})  # the class index: labels in sorted order
        clips, skipped, index = build_manifest(root, listed, classes, self.default_split, CLIP_SECONDS,
                                               self.options.get("val_fraction") or 0.0)
        if not clips:
            raise UserError(f"none of the {len(listed)} clips vggsound.csv lists is under {root} "
                            f"({index.files_seen} video files seen); name them <ytid>_<start>.mp4 (see docs/recipes.md)")
        summary = summarise(self.name, root, classes, clips, skipped, index, self.default_split, started,
                            list=os.path.abspath(path), listed=len(listed))
        write_manifest(out, clips, skipped, summary)
        return summary
