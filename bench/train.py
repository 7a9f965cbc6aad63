#!/usr/bin/env python3
"""Training benchmark: ratios against baselines measured in the same invocation.

    python bench/train.py --clips 144 --workers 2

- loader (224 px, 3 frames, batch 16, equal workers): the shard loader (trainer/loader.py)
  against an OGM-style per-sample loader rebuilt here (librosa + STFT per sample, a JPEG
  file per frame, torchvision transforms) and against a decode-only floor (strip decode and
  cut, nothing else); per-sample strip decode costs; what handing a batch to the main process
  costs a worker (fresh shared segment vs reused pool slot vs heap); cores to keep one H100
  busy (derived);
- step time: MLB and multiloss against joint, same model, same batch.
"""

from __future__ import annotations

import argparse
import gc
import glob
import io
import json
import os
import random
import resource
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


# ResNet18 training rate on an H100, derived (no GPU was lent to the task that wrote this):
# timm's published RTX 3090 figure (results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv
# in huggingface/pytorch-image-models: resnet18, AMP, batch 512, 224 px) times the ratio of
# memory bandwidth, H100 SXM (3.35 TB/s) over RTX 3090 (0.936 TB/s): ResNet18's AMP training
# step is bound by memory traffic (batch norm, activations), not tensor-core FLOPs.
RTX3090_RESNET18_TRAIN_IMG_S = 2764.22
H100_OVER_RTX3090 = 3.35 / 0.936


def images_per_sample(frames: int, spec_shape: tuple[int, int] = (128, 188), image: int = 224) -> float:
    """224-px image equivalents the ResNet preset trains on per sample: its frames, plus the
    one-channel spectrogram through the audio ResNet18 counted by its area."""
    return frames + spec_shape[0] * spec_shape[1] / (image * image)


def explode(shards: str, corpus: str, dest: str) -> list[dict]:
    """The reference layout: a folder of 1-fps JPEGs per clip next to the corpus's WAV."""
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
        clips.append({"frames": folder, "wav": os.path.join(corpus, "AudioWAV", meta["clip_id"] + ".wav"), "label": meta["label"]})
    return clips


class OgmStyle(torch.utils.data.Dataset):
    """The per-sample loader of the OGM-GE family, rebuilt here: librosa load at 22,050 Hz and
    STFT per sample, 3 JPEG files per clip, torchvision RandomResizedCrop/flip/Normalize per
    frame, everything float32 out of the worker."""

    def __init__(self, clips: list[dict], frames: int = 3, image: int = 224) -> None:
        from torchvision import transforms

        self.clips, self.frames = clips, frames
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(image), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        import librosa
        from PIL import Image

        clip = self.clips[i]
        wave, sr = librosa.load(clip["wav"], sr=22050)
        wave = np.clip(np.tile(wave, -(-3 * sr // max(1, len(wave))))[:3 * sr], -1.0, 1.0)
        spec = np.log(np.abs(librosa.stft(wave, n_fft=512, hop_length=353)) + 1e-7)
        files = sorted(glob.glob(os.path.join(clip["frames"], "*.jpg")))
        chosen = sorted(np.random.choice(len(files), size=self.frames, replace=len(files) < self.frames))
        images = torch.stack([self.transform(Image.open(files[k]).convert("RGB")) for k in chosen])
        return {"spec": torch.from_numpy(spec)[None].float(), "frames": images, "label": clip["label"]}


class DecodeFloor(torch.utils.data.IterableDataset):
    """The floor: each worker decodes its share of the strips and cuts the frames (the same
    window, crop and resize as the shard loader), and hands back a count per batch: no shard
    reading, no spectrogram, no batches crossing the process boundary, no training."""

    def __init__(self, strips: list[tuple[bytes, dict]], frames: int, image: int, batch: int) -> None:
        super().__init__()
        self.strips, self.frames, self.image, self.batch = strips, frames, image, batch

    def __iter__(self):
        from trainer.transforms import cut_frames, decode_strip, draw_cut, strip_layout

        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(wid)
        done = 0
        for data, meta in self.strips[wid::n]:
            strip = decode_strip(data)
            count, stride, width = strip_layout(meta)
            cut = draw_cut(count, stride, width, strip.shape[1], self.frames, (0.5, 1.0), True, rng)
            cut_frames(strip, cut, self.frames, self.image)
            done += 1
            if done == self.batch:
                yield done
                done = 0


def decode_costs(shards: str, rounds: int = 3) -> dict:
    """Per-sample CPU time to decode a strip (one thread), best of ``rounds``: the old PIL path,
    torchvision's (the loader's), and PIL's DCT-scaled draft decode at 1/2 and 1/4 size; and
    the share of strip columns a clip leaves unused at 3 and at 1 frame(s)."""
    import webdataset as wds
    from PIL import Image

    from trainer.transforms import decode_strip

    samples = [(s["frames.jpg"], json.loads(s["json"])) for s in
               wds.WebDataset(sorted(glob.glob(os.path.join(shards, "train-*.tar"))), shardshuffle=False)]

    def draft(data: bytes, scale: int) -> np.ndarray:
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (im.width // scale, im.height // scale))
        return np.asarray(im.convert("RGB"))

    ways = {"pil": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), "torchvision": decode_strip,
            "pil_draft_half": lambda b: draft(b, 2), "pil_draft_quarter": lambda b: draft(b, 4)}
    ms = {}
    for name, fn in ways.items():
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()  # CPU time: independent of what else the machine runs
            for data, _ in samples:
                fn(data)
            best = min(best, time.process_time() - start)
        ms[name] = best / len(samples) * 1000
    counts = [m["frames"]["count"] for _, m in samples]
    unused = {f"frames_{k}": sum(max(0, c - k) for c in counts) / max(1, sum(counts)) for k in (3, 1)}
    return {"ms_per_strip": ms, "unused_columns": unused, "strips": len(samples),
            "frame_counts": {str(c): counts.count(c) for c in sorted(set(counts))}}


def handover_costs(batch: int, frames: int, image: int, rounds: int = 3, reps: int = 50) -> dict:
    """CPU ms per batch to stack ``batch`` cut samples (``frames`` x 3 x ``image``^2 uint8) the
    three ways a worker could: into a fresh shared-memory segment (what the loader did before
    ``trainer/batch_pool.py``: new pages faulted in, unmapped when freed), into a reused pool
    slot (what it does now), and on the heap (no process boundary: the floor), best of
    ``rounds``; the same process, one after the other."""
    from trainer.batch_pool import BatchPool, pooled_stack

    samples = [torch.randint(0, 256, (frames, 3, image, image), dtype=torch.uint8) for _ in range(batch)]
    nbytes = batch * samples[0].numel()

    def fresh() -> torch.Tensor:
        return pooled_stack(samples, None)[0]  # no pool: a fresh segment

    pool = BatchPool(1, 2)

    def pooled() -> torch.Tensor:
        out, (slot, number) = pooled_stack(samples, pool, 0)
        pool.release(0, slot, number)  # as the main process does once the batch is used
        return out

    ways = {"fresh_segment": fresh, "pool_slot": pooled, "heap": lambda: torch.stack(samples)}
    ms = {}
    for name, fn in ways.items():
        fn()
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            for _ in range(reps):
                fn()
            best = min(best, time.process_time() - start)
        ms[name] = best / reps * 1000
    return {"ms_per_batch": ms, "batch": batch, "mb_per_batch": nbytes / 1e6,
            "fresh_over_pool": ms["fresh_segment"] / ms["pool_slot"]}


def loader_rates(shards: str, corpus: str, work: str, workers: int, batch: int, epochs: int, image: int,
                 frames: int, rounds: int = 2) -> dict:
    """samples/s of the OGM-style loader, the decode floor and the shard loader: interleaved
    rounds of ``epochs`` passes each, best round per loader (the machine is shared)."""
    import librosa
    import webdataset as wds

    from trainer.data_config import DataConfig
    from trainer.loader import make_loader

    clips = explode(shards, corpus, os.path.join(work, "files"))
    librosa.stft(librosa.load(clips[0]["wav"], sr=22050)[0], n_fft=512, hop_length=353)  # warm, before workers fork
    strips = [(s["frames.jpg"], json.loads(s["json"])) for s in
              wds.WebDataset(sorted(glob.glob(os.path.join(shards, "train-*.tar"))), shardshuffle=False)]
    cfg = DataConfig(modalities={"audio": "spec", "visual": "frames"}, batch_size=batch, workers=workers,
                     image_size=image, frames=frames)

    def ogm() -> int:
        data = torch.utils.data.DataLoader(OgmStyle(clips, frames, image), batch_size=batch, shuffle=True,
                                           num_workers=workers, drop_last=True)
        return sum(b["label"].shape[0] for _ in range(epochs) for b in data)

    def floor() -> int:
        # Workers kept across the round's epochs, as the shard loader keeps its own: the floor
        # pays its worker start once a round too.
        data = torch.utils.data.DataLoader(DecodeFloor(strips, frames, image, batch), batch_size=None, num_workers=workers,
                                           persistent_workers=True)
        n = sum(n for _ in range(epochs) for n in data)
        del data  # the workers exit: their CPU time is counted
        gc.collect()
        return n

    def shards_(finished: bool) -> int:
        # One loader a round, its workers kept across the round's epochs (set_epoch). finished:
        # batches as the model reads them, normalised here on the CPU (a CPU run); otherwise the
        # uint8 batches as they reach the device (a CUDA run normalises them on the GPU).
        loader, _ = make_loader(shards, "train", cfg, train=True)
        n = 0
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            n += sum(b["label"].shape[0] for b in (loader if finished else loader.source))
        del loader  # the workers exit: their CPU time is counted
        gc.collect()
        return n

    torch.set_num_threads(1)  # the main process normalises with one thread, as each worker of the others does
    runs = {"ogm_style": ogm, "decode_floor": floor, "shards": lambda: shards_(False),
            "shards_normalised_on_cpu": lambda: shards_(True)}
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in runs.items():
            start, used = time.perf_counter(), _cpu_seconds()
            n = fn()
            wall[name] = max(wall.get(name, 0.0), n / (time.perf_counter() - start))
            cpu[name] = max(cpu.get(name, 0.0), n / (_cpu_seconds() - used))
    h100 = RTX3090_RESNET18_TRAIN_IMG_S * H100_OVER_RTX3090 / images_per_sample(frames, image=image)
    return {"samples_per_s": wall, "samples_per_cpu_s": cpu,
            "wall_ratios": {"shards_over_ogm_style": wall["shards"] / wall["ogm_style"],
                            "shards_over_floor": wall["shards"] / wall["decode_floor"],
                            "normalised_on_cpu_over_ogm_style": wall["shards_normalised_on_cpu"] / wall["ogm_style"],
                            "normalised_on_cpu_over_floor": wall["shards_normalised_on_cpu"] / wall["decode_floor"]},
            "cpu_ratios": {"shards_over_ogm_style": cpu["shards"] / cpu["ogm_style"],
                           "shards_over_floor": cpu["shards"] / cpu["decode_floor"],
                           "normalised_on_cpu_over_ogm_style": cpu["shards_normalised_on_cpu"] / cpu["ogm_style"],
                           "normalised_on_cpu_over_floor": cpu["shards_normalised_on_cpu"] / cpu["decode_floor"]},
            "workers": workers, "image": image, "frames": frames, "batch": batch, "clips": len(strips),
            "epochs_per_round": epochs, "rounds": rounds, "load_average_at_end": os.getloadavg()[0],
            "h100_resnet_preset_samples_per_s_derived": h100,
            "cores_for_one_h100": h100 / cpu["shards"],
            "note": "warm page cache; best round per loader. samples_per_cpu_s: samples per CPU-second of the "
                    "main process and its loader workers (user + system), i.e. samples/s per fully used core; "
                    "unlike wall rates it does not depend on what else the machine runs"}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have exited."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
    ap.add_argument("--epochs", type=int, default=3, help="passes over the clips per timed round")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds per loader (best kept)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "avbalance-bench-train"))
    ap.add_argument("--skip-loader", action="store_true", help="only the step-time comparison")
    ap.add_argument("--skip-step", action="store_true", help="only the loader comparison")
    ap.add_argument("--decode-only", action="store_true", help="only the strip decode and batch handover costs")
    ap.add_argument("--all-methods", action="store_true", help="also every registered method's step time against joint")
    ap.add_argument("--json", help="merge the results into this file: what this run measured replaces its part, the rest is kept")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shards = build_shards(args.work, max(1, args.clips // 24))
    from trainer.balancing import BALANCERS

    corpus = os.path.join(args.work, "corpus")
    res: dict = {}
    if not args.skip_loader:
        res["decode"] = decode_costs(shards)
        res["handover"] = handover_costs(args.batch, args.frames, args.image)
    if not args.skip_loader and not args.decode_only:
        res["loader"] = loader_rates(shards, corpus, args.work, args.workers, args.batch, args.epochs, args.image, args.frames,
                                     args.rounds)
    if not args.skip_step and not args.decode_only:
        res["step"] = step_times(args.steps, args.batch, width=32, image=112)
    if args.all_methods:
        res["methods"] = step_times(args.steps, args.batch, width=16, image=64, methods=tuple(BALANCERS.names()), rounds=2)
    print(json.dumps(res, indent=2))
    if args.json:
        saved = {}
        if os.path.exists(args.json):
            with open(args.json) as fh:
                saved = json.load(fh)
        with open(args.json, "w") as fh:
            json.dump({**saved, **res}, fh, indent=2)


if __name__ == "__main__":
    main()
