#!/usr/bin/env python3
"""Training benchmark: ratios against baselines measured in the same invocation.

    python bench/train.py --clips 144 --workers 2

- loader: samples/s streaming the shards vs a file-per-sample loader reading the same data
  as individual JPEG and npy files (the reference repositories' layout), same workers,
  same decoding and batch size;
- step time: MLB and multiloss against joint, same model, same batch.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("AVBALANCE_QUIET", "1")


def build_shards(work: str, actors: int) -> str:
    corpus, out = os.path.join(work, "corpus"), os.path.join(work, "pre")
    cli = [sys.executable, os.path.join(REPO, "cli.py")]
    if not os.path.exists(os.path.join(corpus, "synth.json")):
        subprocess.run([*cli, "synth", "cremad", "--out", corpus, "--actors", str(actors), "--sentences", "4"], check=True)
    subprocess.run([*cli, "preprocess", "cremad", "--root", corpus, "--out", out, "--split", "ogm",
                    "--stages", "frames,audio,pack", "--workers", "2"], check=True, stdout=subprocess.DEVNULL)
    return os.path.join(out, "shards", "ogm")


def explode(shards: str, dest: str) -> list[str]:
    """The reference layout: one folder per clip with a JPEG per frame, the spectrogram as npy."""
    import webdataset as wds
    from PIL import Image

    shutil.rmtree(dest, ignore_errors=True)
    clips = []
    for s in wds.WebDataset(sorted(glob.glob(os.path.join(shards, "train-*.tar"))), shardshuffle=False):
        meta = json.loads(s["json"])
        folder = os.path.join(dest, s["__key__"])
        os.makedirs(folder)
        strip = Image.open(io.BytesIO(s["frames.jpg"]))
        stride, count, width = meta["frames"]["stride"], meta["frames"]["count"], meta["video"]["width"]
        for i in range(count):
            strip.crop((i * stride, 0, i * stride + width, strip.height)).save(os.path.join(folder, f"{i:03d}.jpg"), quality=90)
        with open(os.path.join(folder, "spec.npy"), "wb") as fh:
            fh.write(s["spec.npy"])
        with open(os.path.join(folder, "meta.json"), "wb") as fh:
            fh.write(s["json"])
        clips.append(folder)
    return clips


class FilePerSample(torch.utils.data.Dataset):
    """Reads a clip's frames and spectrogram from individual files, decoded like the shards."""

    def __init__(self, folders: list[str], cfg) -> None:
        self.folders, self.cfg = folders, cfg

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        from trainer.data import frames_to_tensor

        folder = self.folders[i]
        meta = json.load(open(os.path.join(folder, "meta.json")))
        frames = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.uint8).copy()).permute(2, 0, 1)
                  for p in sorted(glob.glob(os.path.join(folder, "*.jpg")))]
        x, mask = frames_to_tensor(frames, self.cfg, True, random.Random(i))
        spec = torch.from_numpy(np.load(os.path.join(folder, "spec.npy"), allow_pickle=False).astype(np.float32))[None]
        return {"inputs": {"audio": {"x": spec}, "visual": {"x": x, "mask": mask}}, "label": meta["label"], "clip_id": meta["clip_id"]}


def loader_rates(shards: str, work: str, workers: int, batch: int, epochs: int) -> dict:
    from trainer.data import DataConfig, collate, make_loader

    cfg = DataConfig(modalities={"audio": "spec", "visual": "frames"}, batch_size=batch, workers=workers, image_size=112)
    folders = explode(shards, os.path.join(work, "files"))

    def shard_pass() -> int:
        n = 0
        for epoch in range(epochs):
            loader, _ = make_loader(shards, "train", cfg, train=True, epoch=epoch)
            n += sum(b["label"].shape[0] for b in loader)
        return n

    def file_pass() -> int:
        ds = FilePerSample(folders, cfg)
        n = 0
        for _ in range(epochs):
            dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate, drop_last=True)
            n += sum(b["label"].shape[0] for b in dl)
        return n

    out = {}
    for name, fn in (("files", file_pass), ("shards", shard_pass), ("files_again", file_pass), ("shards_again", shard_pass)):
        start = time.perf_counter()
        n = fn()
        out[name] = n / (time.perf_counter() - start)
    return {"files_samples_s": max(out["files"], out["files_again"]), "shards_samples_s": max(out["shards"], out["shards_again"]),
            "ratio": max(out["shards"], out["shards_again"]) / max(out["files"], out["files_again"]), "workers": workers,
            "note": "warm page cache; best of two passes each"}


def step_times(steps: int, batch: int, width: int, image: int, methods: tuple[str, ...] = ("joint", "multiloss", "mlb"), rounds: int = 3) -> dict:
    from trainer.balancing import build_balancer
    from trainer.model import build_model

    torch.manual_seed(0)
    spec = torch.randn(batch, 1, 128, 188)
    frames = torch.randn(batch, 3, 3, image, image)
    labels = torch.randint(0, 6, (batch,))
    batch_d = {"inputs": {"audio": {"x": spec}, "visual": {"x": frames, "mask": torch.ones(batch, 3, dtype=torch.bool)}}, "label": labels}
    result = {}
    # Interleaved rounds, best of each: step times on a shared 2-core machine drift.
    for method in methods * rounds:
        torch.manual_seed(0)
        model = build_model({"n_classes": 6, "encoders": {"audio": {"name": "resnet18_audio", "width": width},
                                                           "visual": {"name": "resnet18_visual", "width": width}},
                             "fusion": {"name": "late_linear"}})
        bal = build_balancer(method, model)
        if method == "pmr":  # prototypes from one pass, as at an epoch start
            bal.on_epoch_start(model, 0, [{"inputs": batch_d["inputs"], "label": labels}])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for i in range(steps + 2):
            if i == 2:
                start = time.perf_counter()
            out = model(batch_d["inputs"])
            loss, _ = bal.compute_loss(model, batch_d, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            bal.after_backward(model, out, batch_d)
            opt.step()
        ms = (time.perf_counter() - start) / steps * 1000
        result[method] = min(result.get(method, ms), ms)
    return {"ms_per_step": result, "overhead_vs_joint": {m: result[m] / result["joint"] - 1 for m in result},
            "batch": batch, "width": width, "image": image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=144)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "avbalance-bench-train"))
    ap.add_argument("--skip-loader", action="store_true", help="only the step-time comparison")
    ap.add_argument("--all-methods", action="store_true", help="also every registered method's step time against joint")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shards = build_shards(args.work, max(1, args.clips // 24))
    from trainer.balancing import BALANCERS

    res = {"loader": loader_rates(shards, args.work, args.workers, args.batch, args.epochs) if not args.skip_loader else None,
           "step": step_times(args.steps, args.batch, width=32, image=112)}
    if args.all_methods:
        res["methods"] = step_times(args.steps, args.batch, width=16, image=64, methods=tuple(BALANCERS.names()), rounds=2)
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
