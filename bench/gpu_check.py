#!/usr/bin/env python3
"""One prepared check of every CUDA path (issue 26): run it on the first GPU a task is lent.

    make gpu-check                                            # = the line below, then bench/tables.py
    python bench/gpu_check.py --device cuda --out bench/gpu.json
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu.json   # smoke mode: seconds, the fast suite

It builds a small synthetic corpus and its shards (frames, audio, faces), then measures, each
item timed on its own:

- ``resnet_device``: the ResNet preset at the paper's settings (224 px, 3 frames, batch 64,
  bf16): samples/s with batches already on the device (the model's ceiling), GPU busy %;
- ``resnet_loader_w{2,4,8}``: the same steps fed by the shard loader with 2, 4 and 8 workers
  (is the loader the bottleneck?), GPU busy %;
- ``conformer_w2v``: the Conformer preset with a Wav2Vec2 of wav2vec2-large-robust's shape
  (random weights, 12 of its 24 layers kept), batch 16: samples/s and peak memory;
- ``bf16_vs_fp32``: a few hundred steps on the same batches from the same seed in both
  precisions: do the loss curves agree within the stated tolerance?
- ``compile``: the same with ``train.compile`` (``trainer/model.py compile_encoders``) against
  eager: curves, compile time and the speed-up;
- ``jpeg_decode``: ``data.jpeg_decode=cuda`` against the workers' CPU decode: samples/s, and
  the batches equal within the decoders' tolerance;
- ``faces``: the faces + face_features stages with ``--device`` against the torch CPU backend:
  clips/s, frames/s, features within 1e-3 and boxes within 1 px;
- ``ddp``: a 1-process ``torchrun`` of ``cli.py train`` (NCCL on CUDA, gloo on CPU): one epoch.

An item that cannot run here is skipped with its reason; one that fails records its error's
last lines; neither stops the others. The JSON is rewritten after each item, so a check cut
short keeps what it measured. ``--tiny`` shrinks the corpus, the models and the step counts
to seconds on a CPU: it checks that the script runs, not any figure.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("AVBALANCE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from trainer.config import load_config  # noqa: E402
from trainer.loader import make_loader  # noqa: E402
from trainer.eval_pass import to_device  # noqa: E402
from trainer.model import compile_encoders  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.run_config import RunConfig  # noqa: E402
from trainer.run_model import LossStep, build_run_model  # noqa: E402
from trainer.seeding import seed_everything  # noqa: E402

# Loss curves "agree": their 20-step moving averages never differ by more than this (nats).
CURVE_WINDOW = 20
CURVE_TOLERANCE = 0.1
# Features and boxes of the face stages on the device against the torch CPU backend.
FEATURE_TOLERANCE = 1e-3
BOX_TOLERANCE_PX = 1.0
# Frames decoded by nvJPEG against the workers' decode, in 8-bit levels after undoing the
# normalisation: JPEG decoders may round the IDCT and the chroma upsampling differently.
JPEG_MEAN_LEVELS = 1.0


@dataclass(frozen=True)
class Scale:
    """How big each item is: the real check, or the seconds-long smoke mode (``--tiny``)."""

    actors: int = 8
    sentences: int = 4
    image: int = 224
    frames: int = 3
    batch: int = 64
    width: int | None = None  # ResNet width; None: the preset's
    warmup: int = 5
    device_steps: int = 40
    loader_steps: int = 40
    workers: tuple[int, ...] = (2, 4, 8)
    conformer_batch: int = 16
    conformer_steps: int = 15
    # wav2vec2-large-robust's shape: 24 layers of width 1024, 16 heads, FFN 4096, layer norm
    # in the feature encoder; the preset keeps the first 12 layers.
    wav2vec2: dict = field(default_factory=lambda: {"hidden_size": 1024, "num_layers": 24, "num_heads": 16,
                                                    "intermediate_size": 4096, "keep_layers": 12,
                                                    "feat_extract_norm": "layer"})
    face_conformer: dict = field(default_factory=dict)
    curve_steps: int = 300
    curve_batches: int = 8
    compile_backend: str = "inductor"
    face_fps: int = 2
    face_actors: int = 4  # 6 clips each


TINY = Scale(actors=2, sentences=1, image=32, frames=1, batch=4, width=8, warmup=1, device_steps=2, loader_steps=2,
             workers=(0, 1), conformer_batch=2, conformer_steps=1,
             wav2vec2={"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "keep_layers": 1,
                       "cnn_dim": [16] * 7, "pos_conv_kernel": 16, "pos_conv_groups": 2, "d_model": 32, "n_blocks": 1,
                       "n_heads": 2, "conv_kernel": 3},
             face_conformer={"d_model": 32, "n_blocks": 1, "n_heads": 2, "conv_kernel": 3},
             curve_steps=12, curve_batches=2, compile_backend="eager", face_fps=1, face_actors=1)


@dataclass
class Context:
    device: torch.device
    scale: Scale
    work: str
    shards: str | None = None  # built by the "corpus" item
    corpus: str | None = None


# -- measuring ---------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BusySampler:
    """GPU utilisation (%) sampled every 0.2 s in a thread, through NVML (pynvml) or nvidia-smi;
    ``mean`` is None on a CPU or where neither is available (``why`` says which)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self.why = device, [], None
        self._stop = threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reader(self) -> Callable[[], float] | None:
        if self.device.type != "cuda":
            self.why = "not a GPU run"
            return None
        index = self.device.index or 0
        try:
            torch.cuda.utilization(index)  # NVML through pynvml
            return lambda: float(torch.cuda.utilization(index))
        except Exception:  # noqa: BLE001 - pynvml missing or NVML unavailable: try the CLI
            pass
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            return lambda: float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
        self.why = "neither pynvml nor nvidia-smi is available"
        return None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(self._read())
            except Exception as err:  # noqa: BLE001 - a sampler failure must not cost the item
                self.why = f"sampling failed: {err}"
                return

    def __enter__(self) -> "BusySampler":
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def result(self) -> dict:
        if self.samples:
            return {"gpu_busy_pct": round(float(np.mean(self.samples)), 1), "gpu_busy_samples": len(self.samples)}
        return {"gpu_busy_pct": None, "gpu_busy_why": self.why or "no sample taken (the item ran under 0.2 s)"}


def autocast_for(device: torch.device, bf16: bool):
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext


class Stepper:
    """One training step of the loop (forward + the method's loss, backward, the method's
    hook, optimizer step) on a freshly seeded model; losses stay on the device until read."""

    def __init__(self, cfg: dict, device: torch.device, bf16: bool, compile_backend: str | None = None) -> None:
        run = RunConfig.from_dict(cfg)
        seed_everything(run.seed, deterministic=False)
        self.model, self.balancer = build_run_model(run, device)
        self.optimizer = build_optimizer(run, self.balancer.param_groups(self.model, run.optim.lr))
        self.balancer.attach_optimizer(self.optimizer)
        if compile_backend:
            compile_encoders(self.model, compile_backend)
        self.step_fn = LossStep(self.model, self.balancer)
        self.autocast = autocast_for(device, bf16)
        self.device = device

    def __call__(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            loss, held = self.step_fn(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.balancer.after_backward(self.model, held.out, batch)
        self.optimizer.step()
        return loss.detach()


def timed_steps(step: Stepper, batches: Callable[[int], dict], steps: int, warmup: int) -> dict:
    """Warm-up steps, then ``steps`` timed ones; samples/s from the timed ones (synchronised
    only at both ends)."""
    for i in range(warmup):
        step(batches(i))
    sync(step.device)
    seen, tick = 0, time.perf_counter()
    for i in range(steps):
        batch = batches(warmup + i)
        step(batch)
        seen += int(batch["label"].shape[0])
    sync(step.device)
    seconds = time.perf_counter() - tick
    return {"samples_per_s": round(seen / seconds, 2), "steps": steps, "timed_seconds": round(seconds, 3)}


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)}
    return {"peak_memory_gib": None, "peak_memory_why": "measured on CUDA only"}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- configs and data ---------------------------------------------------------------------------

def resnet_config(ctx: Context, **data: Any) -> dict:
    s = ctx.scale
    sets = [f"data.image_size={s.image}", f"data.frames={s.frames}", f"data.batch_size={s.batch}", "model.n_classes=6",
            f"train.device={ctx.device.type}", *[f"data.{k}={v}" for k, v in data.items()]]
    if s.width:
        sets += [f"model.encoders.audio.width={s.width}", f"model.encoders.visual.width={s.width}"]
    cfg = load_config(os.path.join(REPO, "trainer/configs/resnet_joint.yaml"), sets)
    cfg["data"]["shards"] = ctx.shards
    return cfg


def device_batches(ctx: Context, cfg: dict, count: int) -> list[dict]:
    """``count`` real batches of the train part, on the device (read once, with no worker)."""
    d = RunConfig.from_dict(cfg).data
    d = replace(d, workers=0, samples_per_epoch=count * d.batch_size)
    loader, _ = make_loader(ctx.shards, "train", d, train=True, device=ctx.device)
    batches = [to_device(b, ctx.device) for _, b in zip(range(count), loader)]
    if not batches:
        raise RuntimeError("the train part gave no batch")
    return batches


def cycle(batches: list[dict]) -> Callable[[int], dict]:
    return lambda i: batches[i % len(batches)]


def run_cli(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "cli.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)


def checked(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")


# -- the items ----------------------------------------------------------------------------------

ITEMS: dict[str, Callable[[Context], dict]] = {}


def item(name: str):
    def register(fn: Callable[[Context], dict]) -> Callable[[Context], dict]:
        ITEMS[name] = fn
        return fn
    return register


@item("corpus")
def corpus(ctx: Context) -> dict:
    """The synthetic corpus and its shards (frames, audio, pack), built here."""
    s = ctx.scale
    ctx.corpus = os.path.join(ctx.work, "corpus")
    out = os.path.join(ctx.work, "pre")
    if not os.path.exists(os.path.join(ctx.corpus, "synth.json")):
        checked(run_cli(["synth", "cremad", "--out", ctx.corpus, "--actors", str(s.actors), "--sentences", str(s.sentences)]),
                "synth")
    checked(run_cli(["preprocess", "cremad", "--root", ctx.corpus, "--out", out, "--split", "ogm",
                     "--stages", "frames,audio,pack", "--workers", str(min(8, os.cpu_count() or 1))]), "preprocess")
    ctx.shards = os.path.join(out, "shards", "ogm")
    with open(os.path.join(ctx.shards, "shards.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    return {"clips": sum(int(p.get("samples", 0)) for p in index.get("parts", {}).values()) or None, "shards": ctx.shards}


@item("resnet_device")
def resnet_device(ctx: Context) -> dict:
    """The model's ceiling: the preset's step on batches already on the device, bf16."""
    cfg = resnet_config(ctx)
    batches = device_batches(ctx, cfg, 2)
    reset_peak(ctx.device)
    step = Stepper(cfg, ctx.device, bf16=True)
    with BusySampler(ctx.device) as busy:
        result = timed_steps(step, cycle(batches), ctx.scale.device_steps, ctx.scale.warmup)
    return {**result, **busy.result(), **peak_memory(ctx.device), "batch": ctx.scale.batch, "image": ctx.scale.image,
            "frames": ctx.scale.frames}


def resnet_loader(ctx: Context, workers: int) -> dict:
    """The same step fed by the shard loader: decode, crop, batch in ``workers`` processes,
    pinned copies and the side-stream prefetch on CUDA."""
    s = ctx.scale
    cfg = resnet_config(ctx, workers=workers, samples_per_epoch=(s.warmup + s.loader_steps) * s.batch)
    loader, _ = make_loader(ctx.shards, "train", RunConfig.from_dict(cfg).data, train=True, device=ctx.device)
    step = Stepper(cfg, ctx.device, bf16=True)
    it = iter(loader)
    with BusySampler(ctx.device) as busy:
        result = timed_steps(step, lambda i: to_device(next(it), ctx.device), s.loader_steps, s.warmup)
    return {**result, **busy.result(), "workers": workers}


def _register_loader_items() -> None:
    for w in (0, 1, 2, 4, 8):
        item(f"resnet_loader_w{w}")(lambda ctx, w=w: resnet_loader(ctx, w))


_register_loader_items()


@item("conformer_w2v")
def conformer_w2v(ctx: Context) -> dict:
    """The Conformer preset, Wav2Vec2 of wav2vec2-large-robust's shape, random weights, on
    synthetic 6-s waveforms and 300 face-feature frames (the preset's longest inputs)."""
    s = ctx.scale
    sets = ["model.n_classes=6", f"data.batch_size={s.conformer_batch}",
            *[f"model.encoders.audio.{k}={json.dumps(v)}" for k, v in s.wav2vec2.items()],
            *[f"model.encoders.visual.{k}={json.dumps(v)}" for k, v in s.face_conformer.items()]]
    cfg = load_config(os.path.join(REPO, "trainer/configs/conformer_joint.yaml"), sets)
    data = RunConfig.from_dict(cfg).data
    seconds, frames = data.max_wav_seconds, data.max_face_frames
    if ctx.scale is TINY:
        seconds, frames = 0.5, 8
    g = torch.Generator().manual_seed(0)
    b = s.conformer_batch
    wav_len = int(seconds * 16000)

    def batch(i: int) -> dict:
        return {"inputs": {"audio": {"x": torch.randn(b, wav_len, generator=g).to(ctx.device),
                                     "mask": torch.ones(b, wav_len, dtype=torch.bool, device=ctx.device)},
                           "visual": {"x": torch.randn(b, frames, 1408, generator=g).to(ctx.device),
                                      "mask": torch.ones(b, frames, dtype=torch.bool, device=ctx.device)}},
                "label": torch.randint(0, 6, (b,), generator=g).to(ctx.device)}

    fixed = [batch(0), batch(1)]
    reset_peak(ctx.device)
    step = Stepper(cfg, ctx.device, bf16=True)
    with BusySampler(ctx.device) as busy:
        result = timed_steps(step, cycle(fixed), s.conformer_steps, s.warmup)
    params = sum(p.numel() for p in step.model.parameters())
    return {**result, **busy.result(), **peak_memory(ctx.device), "batch": b, "wav_seconds": seconds,
            "face_frames": frames, "parameters_m": round(params / 1e6, 1)}


def curve(ctx: Context, bf16: bool, compile_backend: str | None) -> tuple[list[float], list[float]]:
    """Losses and step times of ``curve_steps`` steps on the same batches from the same seed."""
    cfg = resnet_config(ctx)
    batches = device_batches(ctx, cfg, ctx.scale.curve_batches)
    step = Stepper(cfg, ctx.device, bf16=bf16, compile_backend=compile_backend)
    losses, times = [], []
    for i in range(ctx.scale.curve_steps):
        tick = time.perf_counter()
        losses.append(step(batches[i % len(batches)]))
        sync(ctx.device)
        times.append(time.perf_counter() - tick)
    return [float(x) for x in losses], times


def compare_curves(a: list[float], b: list[float]) -> dict:
    window = min(CURVE_WINDOW, len(a))
    kernel = np.ones(window) / window
    smooth_a, smooth_b = np.convolve(a, kernel, "valid"), np.convolve(b, kernel, "valid")
    gap = float(np.max(np.abs(smooth_a - smooth_b)))
    return {"max_moving_average_gap": round(gap, 4), "window": window, "tolerance": CURVE_TOLERANCE,
            "agree": gap <= CURVE_TOLERANCE, "first_loss": [round(a[0], 4), round(b[0], 4)],
            "last_window_mean": [round(float(smooth_a[-1]), 4), round(float(smooth_b[-1]), 4)]}


@item("bf16_vs_fp32")
def bf16_vs_fp32(ctx: Context) -> dict:
    fp32, t32 = curve(ctx, bf16=False, compile_backend=None)
    bf16, t16 = curve(ctx, bf16=True, compile_backend=None)
    skip = min(len(t32) - 1, ctx.scale.warmup)
    return {**compare_curves(fp32, bf16), "steps": len(fp32), "pair": ["fp32", "bf16"],
            "bf16_speedup": round(float(np.median(t32[skip:]) / np.median(t16[skip:])), 3)}


@item("compile")
def compile_item(ctx: Context) -> dict:
    bf16 = ctx.device.type == "cuda"
    eager, te = curve(ctx, bf16=bf16, compile_backend=None)
    compiled, tc = curve(ctx, bf16=bf16, compile_backend=ctx.scale.compile_backend)
    skip = min(len(te) - 1, ctx.scale.warmup)
    return {**compare_curves(eager, compiled), "steps": len(eager), "pair": ["eager", "compiled"],
            "backend": ctx.scale.compile_backend, "precision": "bf16" if bf16 else "fp32",
            "first_step_seconds": [round(te[0], 2), round(tc[0], 2)],
            "speedup": round(float(np.median(te[skip:]) / np.median(tc[skip:])), 3)}


@item("jpeg_decode")
def jpeg_decode(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        raise Skip("data.jpeg_decode=cuda decodes with nvJPEG on the training GPU: needs a CUDA device")
    results, firsts = {}, {}
    for decoder in ("cpu", "cuda"):
        cfg = resnet_config(ctx, jpeg_decode=decoder, workers=4)
        loader, _ = make_loader(ctx.shards, "train", RunConfig.from_dict(cfg).data, train=False, device=ctx.device)
        sync(ctx.device)
        tick, seen = time.perf_counter(), 0
        for i, batch in enumerate(loader):
            batch = to_device(batch, ctx.device)
            if i < 3:
                firsts.setdefault(decoder, []).append(batch["inputs"]["visual"]["x"].float())
            seen += int(batch["label"].shape[0])
        sync(ctx.device)
        results[f"samples_per_s_{decoder}"] = round(seen / (time.perf_counter() - tick), 2)
    from trainer.transforms import IMAGENET_STD
    std = IMAGENET_STD.to(ctx.device).view(1, 1, 3, 1, 1)
    diffs = [((a - b).abs() * std * 255) for a, b in zip(firsts["cpu"], firsts["cuda"])]
    mean = float(torch.cat([d.flatten() for d in diffs]).mean())
    worst = float(max(d.max() for d in diffs))
    return {**results, "mean_abs_levels": round(mean, 3), "max_abs_levels": round(worst, 2),
            "tolerance_mean_levels": JPEG_MEAN_LEVELS, "equal_within_tolerance": mean <= JPEG_MEAN_LEVELS}


def face_cache(out: str, stage: str) -> dict[str, dict[str, np.ndarray]]:
    """{clip id: arrays} of a stage's cache (files are CLIP-KEY.npz)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "cache", stage, "*.npz"))):
        with np.load(path, allow_pickle=False) as z:
            found[os.path.basename(path).rsplit("-", 1)[0]] = {k: z[k] for k in z.files}
    return found


@item("faces")
def faces(ctx: Context) -> dict:
    """faces + face_features on ``--device`` against torch on the CPU, same frames; on a CPU
    run the candidate is the CPU with another batch size (the comparison code still runs)."""
    s = ctx.scale
    corpus, base = os.path.join(ctx.work, "faces_corpus"), os.path.join(ctx.work, "faces_base")
    if not os.path.exists(os.path.join(corpus, "synth.json")):
        checked(run_cli(["synth", "cremad", "--out", corpus, "--actors", str(s.face_actors), "--sentences", "1"]), "synth")
    common = ["preprocess", "cremad", "--root", corpus, "--split", "ogm", "--allow-random-weights",
              "--face-fps", str(s.face_fps), "--workers", "1"]
    checked(run_cli([*common, "--out", base, "--stages", "frames"]), "preprocess --stages frames")
    runs = {"reference": ["--device", "cpu", "--backend", "torch", "--batch-size", "32"],
            "candidate": (["--device", "cuda", "--backend", "torch"] if ctx.device.type == "cuda"
                          else ["--device", "cpu", "--backend", "torch", "--batch-size", "3"])}
    measured, caches = {}, {}
    for name, extra in runs.items():
        out = os.path.join(ctx.work, f"faces_{name}")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        tick = time.perf_counter()
        checked(run_cli([*common, "--out", out, "--stages", "frames,faces,face_features", *extra]), f"faces ({name})")
        seconds = time.perf_counter() - tick
        caches[name] = (face_cache(out, "faces"), face_cache(out, "face_features"))
        clips = len(caches[name][1])
        frames = sum(len(next(iter(v.values()))) for v in caches[name][1].values())
        measured[name] = {"seconds": round(seconds, 2), "clips": clips, "clips_per_s": round(clips / seconds, 3),
                          "frames_per_s": round(frames / seconds, 2), "args": " ".join(extra)}
    (ref_boxes, ref_feats), (cand_boxes, cand_feats) = caches["reference"], caches["candidate"]
    if set(ref_feats) != set(cand_feats) or not ref_feats:
        raise RuntimeError(f"the two runs cached different clips: {sorted(ref_feats)} vs {sorted(cand_feats)}")
    feature_gap = box_gap = 0.0
    for key in ref_feats:
        for name, ref in ref_feats[key].items():
            if ref.dtype.kind == "f":
                feature_gap = max(feature_gap, float(np.max(np.abs(ref - cand_feats[key][name]), initial=0.0)))
        for name, ref in ref_boxes[key].items():
            if ref.dtype.kind == "f" and ref.ndim == 2 and ref.shape[-1] == 4:
                both = np.isfinite(ref) & np.isfinite(cand_boxes[key][name])
                box_gap = max(box_gap, float(np.max(np.abs(ref - cand_boxes[key][name])[both], initial=0.0)))
    return {**{f"{k}_{n}": v for n, r in measured.items() for k, v in r.items()},
            "max_feature_gap": feature_gap, "feature_tolerance": FEATURE_TOLERANCE,
            "max_box_gap_px": round(box_gap, 3), "box_tolerance_px": BOX_TOLERANCE_PX,
            "equal_within_tolerance": feature_gap <= FEATURE_TOLERANCE and box_gap <= BOX_TOLERANCE_PX}


@item("ddp")
def ddp(ctx: Context) -> dict:
    """``torchrun --nproc_per_node 1 cli.py train`` for one epoch (NCCL on CUDA, gloo on CPU)."""
    s = ctx.scale
    out = os.path.join(ctx.work, "ddp_run")
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"data.image_size={s.image}", f"data.frames={s.frames}", f"data.batch_size={s.batch}", "data.workers=2",
            "train.epochs=1", "train.patience=0", f"train.device={ctx.device.type}"]
    if s.width:
        sets += [f"model.encoders.audio.width={s.width}", f"model.encoders.visual.width={s.width}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           os.path.join(REPO, "cli.py"), "train", "--config", os.path.join(REPO, "trainer/configs/resnet_joint.yaml"),
           "--shards", ctx.shards, "--out", out, "--set", *sets]
    tick = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NCCL_DEBUG": "INFO"}, timeout=900,
                          check=False)
    checked(proc, "torchrun cli.py train")
    with open(os.path.join(out, "eval_test.json"), encoding="utf-8") as fh:
        tested = json.load(fh)
    backend = "nccl" if "NCCL INFO" in proc.stdout + proc.stderr else ("gloo" if ctx.device.type == "cpu" else "unknown")
    return {"seconds": round(time.perf_counter() - tick, 2), "backend": backend, "test_accuracy": tested["accuracy"]}


class Skip(Exception):
    """An item that cannot run on this machine; its message is the reason."""


# -- running ------------------------------------------------------------------------------------

def default_items(device: torch.device, scale: Scale) -> list[str]:
    loaders = [f"resnet_loader_w{w}" for w in scale.workers]
    return ["corpus", "resnet_device", *loaders, "conformer_w2v", "bf16_vs_fp32", "compile", "jpeg_decode", "faces", "ddp"]


def describe(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "host_cpus": os.cpu_count()}
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1))
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def write(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: tiny corpus, models and step counts (seconds on a CPU)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "gpu.json"))
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--only", help="comma-separated items (corpus is always built first); default: all")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device here; for the smoke mode run "
              "`python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu.json`", file=sys.stderr)
        return 2
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    scale = TINY if args.tiny else Scale()
    wanted = default_items(device, scale)
    if args.only:
        asked = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in asked if x not in ITEMS]
        if unknown:
            print(f"error: unknown item(s) {', '.join(unknown)}; known: {', '.join(ITEMS)}", file=sys.stderr)
            return 2
        wanted = ["corpus", *[x for x in asked if x != "corpus"]]
    work = args.work or tempfile.mkdtemp(prefix="avb_gpu_check_")
    os.makedirs(work, exist_ok=True)
    ctx = Context(device=device, scale=scale, work=work)
    report = {"mode": "tiny" if args.tiny else "full", "scale": asdict(scale), **describe(device),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "items": {}}
    begin = time.perf_counter()
    try:
        for name in wanted:
            tick = time.perf_counter()
            try:
                if name != "corpus" and ctx.shards is None:
                    raise Skip("the corpus item failed, so there are no shards")
                result = {"status": "ok", **ITEMS[name](ctx)}
            except Skip as why:
                result = {"status": "skipped", "reason": str(why)}
            except Exception as err:  # noqa: BLE001 - one failure must not cost the other items
                lines = traceback.format_exception(err)
                result = {"status": "failed", "error": "".join(lines[-3:]).strip()[-1500:]}
            result["seconds"] = round(time.perf_counter() - tick, 2)
            report["items"][name] = result
            report["total_seconds"] = round(time.perf_counter() - begin, 1)
            write(args.out, report)
            print(f"{name}: {result['status']} in {result['seconds']} s", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, r in report["items"].items() if r["status"] == "failed"]
    print(f"wrote {args.out}: {len(report['items'])} items, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}, {report['total_seconds']} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
