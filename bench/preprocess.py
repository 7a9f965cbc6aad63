#!/usr/bin/env python3
"""Preprocessing benchmark: every figure is a ratio against a baseline measured in the same
invocation, on the same clips, with the same process count.

    python bench/preprocess.py --clips 144 --workers 2 --face-clips 6
    python bench/preprocess.py --faces-only --face-clips 4 --json bench/faces.json
    python bench/preprocess.py --clips 144 --workers 2 --engine ray --json bench/preprocess.json

- floor: in-process PyAV decoding of every frame, nothing else;
- reference: OpenCV decoding every frame and writing a JPEG per second to files
  (the way the reference repositories extract frames);
- pipeline: `preprocess --stages frames,audio,pack` (and each stage alone);
- faces: MTCNN + EfficientNet-B2 batched across clips vs one frame per call;
- backends: torch vs ONNX Runtime on the same frames, crops and threads (both networks,
  EfficientNet-B2 at several batch sizes), and both face stages end to end per backend;
- box carrying and downscaled detection vs full-size detection on every frame (speed, box IoU);
- peak memory of a run on a small and on a 4x larger corpus (it must stay flat);
- with ``--engine ray`` only: the Ray engine against the local one (bench/ray_engine.py:
  interleaved rounds, whole runs, steady state, first clip, CPU by process kind, shard
  identity; ``--baseline REF`` adds an older revision's Ray engine); stored under
  ``engine_ray`` in the ``--json`` file (other keys kept).

    python bench/preprocess.py --mp4 24 --workers 2

``--mp4 N`` measures the ``folder`` recipe instead: N synthetic 10 s mp4 clips (H.264 + AAC,
480x360, 25 fps, the shape of AVE / VGGSound downloads): the floor, frames+audio+pack, and
each stage alone.

``--faces-only`` measures only the face stages (backends end to end and per network, ONNX
Runtime's thread spinning, box carrying, downscaled detection) on ``--face-clips`` clips.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("AVBALANCE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synth(out: str, actors: int, sentences: int) -> list[str]:
    if not os.path.exists(os.path.join(out, "synth.json")):
        subprocess.run([sys.executable, os.path.join(REPO, "cli.py"), "synth", "cremad", "--out", out,
                        "--actors", str(actors), "--sentences", str(sentences)], check=True)
    return sorted(glob.glob(os.path.join(out, "VideoFlash", "*.flv")))


def _decode_all(path: str) -> int:
    import av

    with av.open(path) as c:
        return sum(1 for _ in c.decode(video=0))


def _opencv_reference(args: tuple[str, str]) -> int:
    """Decode every frame with OpenCV, write the first frame of each second as a JPEG file."""
    import cv2

    path, out = args
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS) or 30
    i = written = 0
    os.makedirs(out, exist_ok=True)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % int(round(fps)) == 0:
            cv2.imwrite(os.path.join(out, f"{written:03d}.jpg"), frame)
            written += 1
        i += 1
    cap.release()
    return written


def rate(fn, items, workers: int) -> float:
    """Items per second over a pool of ``workers`` processes (in-process when 1)."""
    start = time.perf_counter()
    if workers <= 1:
        for item in items:
            fn(item)
    else:
        with get_context("fork").Pool(workers) as pool:
            list(pool.imap_unordered(fn, items, chunksize=4))
    return len(items) / (time.perf_counter() - start)


LAST_CPU_SECONDS = [0.0]
LAST_SECONDS = [0.0]  # wall seconds of the last run_preprocess, the wrapper's start-up included


def run_preprocess(root: str, out: str, stages: str, workers: int, extra: list[str] | None = None,
                   corpus: list[str] | None = None, tree: str = REPO) -> tuple[float, dict, int]:
    """Run the CLI in a subprocess; return (clips/s over the whole run, summary, peak RSS MB).
    ``corpus``: the recipe and its options (default CREMA-D, split ogm); ``tree``: the checkout
    whose CLI runs (default this one; ``--baseline`` passes an older revision's)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(tree, "cli.py"), "preprocess", *(corpus or ["cremad", "--split", "ogm"]),
           "--root", root, "--out", out, "--stages", stages, "--workers", str(workers), *(extra or [])]
    # A wrapper process reports the peak RSS of this run's processes alone (the largest one).
    # It also reports their CPU time (user + system, workers included): on a shared machine
    # clips per CPU-second say what the work costs whatever else runs.
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "r = resource.getrusage(resource.RUSAGE_CHILDREN); print(r.ru_maxrss, r.ru_utime + r.ru_stime)")
    env = {**os.environ, "PYTHONPATH": tree}  # the tree's own packages, not the installed checkout's
    start = time.perf_counter()
    peak, cpu = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True,
                               cwd=tree, env=env).stdout.split()
    peak_kb = int(peak)
    LAST_CPU_SECONDS[0] = float(cpu)  # CPU time of the run's processes: what a shared machine does not distort
    seconds = time.perf_counter() - start
    LAST_SECONDS[0] = seconds
    summary = json.load(open(os.path.join(out, "preprocess.json")))
    summary["clips_per_cpu_s"] = summary["clips"] / float(cpu)
    return summary["clips"] / seconds, summary, int(peak_kb) // 1024


def face_batching(files: list[str], n_frames: int = 64, batch: int = 32) -> dict:
    """MTCNN detection and EfficientNet-B2 features: batched vs one frame per call."""
    import av
    import torch
    from facenet_pytorch import MTCNN

    from pipelines.stages.face_features import FaceFeaturesConfig, FaceFeaturesStage

    frames = []
    for path in files:
        with av.open(path) as c:
            frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        if len(frames) >= n_frames:
            break
    frames = np.stack(frames[:n_frames])
    mtcnn = MTCNN(keep_all=True, min_face_size=40)
    mtcnn.detect(frames[:2])
    t = time.perf_counter()
    for f in frames:
        mtcnn.detect(f)
    single = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(frames), batch):
        mtcnn.detect(frames[i:i + batch])
    batched = time.perf_counter() - t
    net = FaceFeaturesStage(FaceFeaturesConfig(allow_random=True))
    crops = torch.rand(n_frames, 3, 260, 260) * 255
    net.features(crops[:2])
    t = time.perf_counter()
    for i in range(len(crops)):
        net.features(crops[i:i + 1])
    f_single = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(crops), batch):
        net.features(crops[i:i + batch])
    f_batched = time.perf_counter() - t
    return {
        "frames": n_frames,
        "mtcnn_per_frame_fps": n_frames / single, "mtcnn_batched_fps": n_frames / batched,
        "effnet_per_frame_fps": n_frames / f_single, "effnet_batched_fps": n_frames / f_batched,
        "faces_per_frame_fps": n_frames / (single + f_single), "faces_batched_fps": n_frames / (batched + f_batched),
    }


def _rates(fn, n: int) -> tuple[float, float]:
    """(items/s of wall time, items/s of CPU time) of one call of ``fn`` over ``n`` items. CPU
    time is what the work costs when other jobs share the cores (as on the benchmark machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def _effnet_call(stage, crops):
    """One EfficientNet-B2 call on exactly these crops (the stage's own micro-batching aside)."""
    import torch

    if stage.backend == "onnx":
        return stage.session.run(None, {"x": crops.numpy()})
    with torch.inference_mode():
        return stage.model(((crops - stage.mean) / stage.std).contiguous(memory_format=torch.channels_last))


def backend_comparison(files: list[str], threads: tuple[int, ...], n_frames: int = 32, batches=(1, 4, 8),
                       rounds: int = 2) -> list[dict]:
    """torch vs ONNX Runtime on the same frames and crops with the same threads: MTCNN (the
    stage's cascade, ``FaceBatcher.detect``) on a batch of ``n_frames`` frames, EfficientNet-B2
    at each batch size (the stage uses 8 with torch, ``onnx_step(threads)`` with ONNX Runtime);
    ONNX Runtime with its idle threads spinning and not (``spinning``). The variants alternate
    and each keeps its best of ``rounds``."""
    import av
    import torch

    from pipelines.stages import face_features as ff
    from pipelines.stages import onnx_backend
    from pipelines.stages.faces import FaceBatcher, FacesConfig

    frames = []
    for path in files:
        with av.open(path) as c:
            frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    frames = np.stack(frames[:n_frames])
    crops = torch.rand(16, 3, 260, 260, generator=torch.Generator().manual_seed(0)) * 255
    variants = (("torch", None), ("onnx", True), ("onnx", False))  # (backend, ONNX Runtime threads spin)
    default_spinning = onnx_backend.SPINNING
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        nets = {}
        for b, spin in variants:
            onnx_backend.SPINNING = default_spinning if spin is None else spin  # read when the sessions are made
            nets[(b, spin)] = (FaceBatcher(FacesConfig(), None, backend=b, threads=n),
                               ff.FaceFeaturesStage(ff.FaceFeaturesConfig(allow_random=True, weights_sha256="random-init-seed0"),
                                                    backend=b, threads=n))
        onnx_backend.SPINNING = default_spinning
        best: dict[tuple, tuple[float, float]] = {}
        for _ in range(rounds):
            for variant, (batcher, feats) in nets.items():
                batcher.detect(frames[:2])  # warm
                jobs = {"mtcnn": (lambda m=batcher: m.detect(frames), len(frames))}
                for bs in batches:
                    jobs[f"effnet_b{bs}"] = (lambda bs=bs, f=feats: [_effnet_call(f, crops[i:i + bs]) for i in range(0, len(crops), bs)],
                                             len(crops))
                for name, (fn, count) in jobs.items():
                    if name.startswith("effnet"):
                        fn()  # warm this shape
                    got = _rates(fn, count)
                    old = best.get((*variant, name), (0.0, 0.0))
                    best[(*variant, name)] = (max(old[0], got[0]), max(old[1], got[1]))
        for (b, spin, name), (wall, cpu) in best.items():
            rows.append({"threads": n, "backend": b, "spinning": spin, "what": name, "per_s": wall, "per_cpu_s": cpu})
    return rows


def box_carrying(files: list[str], rates=(10.0, 5.0, 2.0), scales=(0.5,), backend: str = "torch") -> list[dict]:
    """Speed and box agreement (IoU) of detection at a lower rate, and of detection on a
    downscaled frame, vs full-size detection on every frame."""
    import av

    from pipelines.stages.faces import FaceBatcher, FacesConfig

    clips = []
    for path in files:
        with av.open(path) as c:
            clips.append([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])

    def run(cfg):
        batcher = FaceBatcher(cfg, None, backend=backend)
        start = time.perf_counter()
        out = []
        for i, frames in enumerate(clips):
            batcher.start_clip(str(i))
            for k, rgb in enumerate(frames):
                batcher.push(str(i), k, k / 30, rgb)
        batcher.flush()
        for i in range(len(clips)):
            out.append(batcher.finish_clip(str(i))[0])
        return time.perf_counter() - start, out

    base_s, base = run(FacesConfig())
    rows = []
    for r in rates:
        s, got = run(FacesConfig(detect_fps=r))
        ious = np.concatenate([_iou(a["boxes"], b["boxes"]) for a, b in zip(base, got)])
        rows.append({"detect_fps": r, "speedup": base_s / s, "iou_mean": float(ious.mean()), "iou_min": float(ious.min()),
                     "iou_p05": float(np.percentile(ious, 5))})
    for scale in scales:
        s, got = run(FacesConfig(detect_scale=scale))
        full, small = (np.concatenate([c["mask"] for c in run_]).astype(bool) for run_ in (base, got))
        ious = np.concatenate([_iou(a["boxes"], b["boxes"]) for a, b in zip(base, got)])[full & small]
        rows.append({"detect_scale": scale, "speedup": base_s / s, "iou_mean": float(ious.mean()), "iou_min": float(ious.min()),
                     "iou_p05": float(np.percentile(ious, 5)), "faces_found": int(small.sum()), "faces_full_size": int(full.sum())})
    return rows


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0 = np.maximum(a[:, 0], b[:, 0]); y0 = np.maximum(a[:, 1], b[:, 1])
    x1 = np.minimum(a[:, 2], b[:, 2]); y1 = np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])
    return inter / (area(a) + area(b) - inter)


def _decode_cpu(files: list[str]) -> float:
    """CPU seconds of the floor (in-process PyAV decode of every frame) over ``files``."""
    start = time.process_time()
    for f in files:
        _decode_all(f)
    return time.process_time() - start


def mp4_bench(n: int, workers: int, work: str) -> dict:
    """The folder recipe on ``n`` 10 s mp4 clips: clips/s against the in-process decode floor.
    Start-up (imports, warm-up) weighs heavily on a few long clips, so the steady-state rate
    is the marginal one: the extra clips of the ``n``-clip run over a quarter-size run, per
    extra second, as for CREMA-D."""
    from pipelines.synth.layouts import write_folder_corpus

    root = os.path.join(work, f"mp4_{n}")
    if not os.path.exists(os.path.join(root, "labels.csv")):
        write_folder_corpus(root + ".part", classes=4, per_class=-(-n // 4), seconds=10.0, fps=25, size=(480, 360))
        os.replace(root + ".part", root)
    labels = os.path.join(root, "labels.csv")
    with open(labels) as fh:
        lines = fh.read().splitlines()
    small_n = max(1, (len(lines) - 1) // 4)
    small = os.path.join(work, f"labels_{small_n}.csv")
    with open(small, "w") as fh:
        fh.write("\n".join([lines[0]] + lines[1:][::4][:small_n]) + "\n")
    files = sorted(glob.glob(os.path.join(root, "*", "*.mp4")))
    out = os.path.join(work, "out_mp4")
    res: dict = {"clips": len(files), "small_clips": small_n, "seconds_per_clip": 10.0, "size": "480x360", "fps": 25,
                 "workers": workers, "cpu": os.cpu_count(), "floor_clips_s": rate(_decode_all, files, workers)}
    # CPU seconds per clip too: on a machine shared with other jobs, wall times swing with the
    # load, CPU time much less.
    res["floor_cpu_s_per_clip"] = _decode_cpu(files) / len(files)
    big_rate, summary, res["pipeline_peak_mb"] = run_preprocess(root, out, "frames,audio,pack", workers,
                                                                corpus=["folder", "--labels", labels])
    big_cpu = LAST_CPU_SECONDS[0]
    small_rate = run_preprocess(root, out + "_small", "frames,audio,pack", workers, corpus=["folder", "--labels", small])[0]
    small_cpu = LAST_CPU_SECONDS[0]
    res["pipeline_cpu_s_per_clip"] = big_cpu / len(files)
    res["pipeline_marginal_cpu_s_per_clip"] = (big_cpu - small_cpu) / (len(files) - small_n)
    res["marginal_cpu_over_floor"] = res["pipeline_marginal_cpu_s_per_clip"] / res["floor_cpu_s_per_clip"]
    res["pipeline_clips_s"] = big_rate
    res["pipeline_phase_seconds"] = summary["phase_seconds"]
    t_big, t_small = len(files) / big_rate, small_n / small_rate
    res["pipeline_marginal_clips_s"] = (len(files) - small_n) / (t_big - t_small)
    res["floor_over_marginal"] = res["floor_clips_s"] / res["pipeline_marginal_clips_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=144, help="corpus size: 6 emotions x 4 sentences x actors")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--face-clips", type=int, default=6, help="clips for the (slow) face stages")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "avbalance-bench"))
    ap.add_argument("--faces-only", action="store_true", help="only the face-stage measurements")
    ap.add_argument("--rounds", type=int, default=None,
                    help="face runs per backend, alternating, the best counts (default 2); with --engine ray: "
                         "interleaved local/ray rounds, medians kept (default 3)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--mp4", type=int, default=0, metavar="N", help="instead: the folder recipe on N 10 s mp4 clips")
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="ray: only compare the Ray engine with the local one (key engine_ray of --json)")
    ap.add_argument("--ray-address", help="with --engine ray: a running cluster (default: a local runtime of --workers CPUs)")
    ap.add_argument("--cluster", action="store_true",
                    help="with --engine ray: also time the Ray engine on a head node started once for all rounds")
    ap.add_argument("--baseline", action="append", default=[], metavar="REF",
                    help="with --engine ray: also time the Ray engine of this git revision, in the same rounds; "
                         "with --faces-only: also time the face stages of this revision (its default backend)")
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 3 if args.engine == "ray" else 2
    # Exported ONNX networks are cached here, so the end-to-end runs measure the steady state.
    os.environ.setdefault("AVBALANCE_CACHE_DIR", os.path.join(args.work, "cache"))
    if args.mp4:
        res = mp4_bench(args.mp4, args.workers, args.work)
        print(json.dumps(res, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
        return
    # The face stages need only --face-clips clips: --faces-only makes no larger corpus (24 clips an actor).
    actors = max(1, -(-args.face_clips // 24) if args.faces_only else args.clips // 24)
    small_root = os.path.join(args.work, f"corpus{actors}")
    synth(small_root, actors, 4)
    # Throughput is measured on the 4x corpus, where start-up costs (imports, model loads)
    # weigh little; the 1x corpus serves the peak-memory comparison and the marginal rate.
    root = small_root if args.faces_only else os.path.join(args.work, f"corpus{actors * 4}")
    files = synth(root, actors * (1 if args.faces_only else 4), 4)
    n = len(files)
    if args.engine == "ray":
        from bench.ray_engine import compare, render

        def save(found: dict) -> None:  # after every round
            if args.json:
                res = json.load(open(args.json)) if os.path.exists(args.json) else {}
                res["engine_ray"] = found
                with open(args.json, "w") as fh:
                    json.dump(res, fh, indent=2)

        found = compare(root, n, args.workers, args.work, args.ray_address, args.rounds, args.baseline, args.cluster, save)
        print(json.dumps({k: v for k, v in found.items() if k != "runs"}, indent=2))
        print(render(found))
        return
    res: dict = {"clips": n, "workers": args.workers, "cpu": os.cpu_count()}
    if not args.faces_only:
        pipeline_rates(res, files, root, small_root, args)
        _save(res, args.json)
    face_rates(res, files, root, args)

    # CREMA-D: 7,442 clips, mean 2.5 s at 30 fps (~75 face frames a clip).
    full = 7442
    res["estimate_cremad_hours"] = {f"faces_{k}": full / v / 3600 for k, v in res["faces_steady_clips_s"].items()
                                    if "_over_" not in k}
    if not args.faces_only:
        res["estimate_cremad_hours"]["frames_audio_pack"] = full / res["pipeline_marginal_clips_s"] / 3600
    print(json.dumps(res, indent=2))
    _save(res, args.json)


def _save(res: dict, path: str | None) -> None:
    """Write what is measured so far (a long run on a shared machine keeps its parts); the
    Ray comparison, measured by its own invocation, is kept from the file."""
    if path:
        previous = json.load(open(path)) if os.path.exists(path) else {}
        if "engine_ray" in previous:
            res["engine_ray"] = previous["engine_ray"]
        with open(path, "w") as fh:
            json.dump(res, fh, indent=2)


def pipeline_rates(res: dict, files: list[str], root: str, small_root: str, args: argparse.Namespace) -> None:
    """Decode floor, the OpenCV reference, the pipeline without faces, peak memory."""
    n = len(files)
    res["floor_clips_s"] = rate(_decode_all, files, args.workers)
    try:
        import cv2  # noqa: F401

        ref_dir = os.path.join(args.work, "reference")
        shutil.rmtree(ref_dir, ignore_errors=True)
        res["reference_clips_s"] = rate(_opencv_reference, [(f, os.path.join(ref_dir, os.path.basename(f))) for f in files], args.workers)
    except ImportError:
        res["reference_clips_s"] = None  # pip install opencv-python-headless (make bench does)

    out = os.path.join(args.work, "out")
    res["pipeline_clips_s"], summary, res["pipeline_peak_mb"] = run_preprocess(root, out, "frames,audio,pack", args.workers)
    res["pipeline_phase_seconds"] = summary["phase_seconds"]
    small_rate, small_summary, res["pipeline_small_peak_mb"] = run_preprocess(small_root, out + "small", "frames,audio,pack", args.workers)
    res["pipeline_small_clips"] = small_summary["clips"]
    # Steady state: the extra clips of the large run over the extra time they took.
    t_big, t_small = n / res["pipeline_clips_s"], small_summary["clips"] / small_rate
    res["pipeline_marginal_clips_s"] = (n - small_summary["clips"]) / (t_big - t_small)
    res["frames_clips_s"] = run_preprocess(root, out, "frames", args.workers)[0]
    res["audio_clips_s"] = run_preprocess(root, out, "audio", args.workers)[0]


def face_rates(res: dict, files: list[str], root: str, args: argparse.Namespace) -> None:
    """Both face stages end to end per backend (alternating, best of ``--rounds``), the backends
    side by side per network, box carrying and downscaled detection; batching in a full run."""
    from pipelines.stages.face_features import FaceFeaturesConfig, export_onnx
    from pipelines.stages.faces import export_mtcnn

    # The runs cover --face-clips clips and twice as many: the extra clips over the extra time
    # are the steady-state rate, what a full corpus sees (start-up, imports and model loads are
    # paid once per command and weigh heavily on a few clips).
    roots = {}
    for count in (args.face_clips, 2 * args.face_clips):
        roots[count] = face_root = os.path.join(args.work, f"faces{count}")
        shutil.rmtree(face_root, ignore_errors=True)
        for d in ("VideoFlash", "AudioWAV"):
            os.makedirs(os.path.join(face_root, d))
        for f in files[:count]:
            stem = os.path.splitext(os.path.basename(f))[0]
            shutil.copy(f, os.path.join(face_root, "VideoFlash"))
            shutil.copy(os.path.join(root, "AudioWAV", stem + ".wav"), os.path.join(face_root, "AudioWAV"))
    export_mtcnn()  # once, outside the timed runs (a re-run finds them in the cache)
    export_onnx(FaceFeaturesConfig(allow_random=True, weights_sha256="random-init-seed0"))
    out = os.path.join(args.work, "out")
    runs = {"every_frame": [], "fps5": ["--face-fps", "5"]}
    # (name, checkout, options): both backends here, and each --baseline revision as it ran by
    # default (before --backend existed: torch, facenet-pytorch's cascade).
    variants = [(backend, REPO, ["--backend", backend]) for backend in ("torch", "onnx")]
    for ref in args.baseline:
        from bench.ray_engine import tree_of

        tree = tree_of(ref, args.work)
        variants.append((os.path.basename(tree).replace("tree-", "at_"), tree, []))
    res["baselines"] = [name for name, tree, _ in variants if tree != REPO]
    res["face_clips"] = args.face_clips
    # Per variant and round: (seconds, CPU seconds) for the short and the doubled run.
    timed: dict[str, list[dict[int, tuple[float, float]]]] = {}
    for _ in range(args.rounds):
        for name, extra in runs.items():
            for variant, tree, options in variants:
                got = {}
                for count, face_root in roots.items():
                    _, summary, _ = run_preprocess(face_root, out, "faces,face_features", args.workers,
                                                   ["--allow-random-weights", *options, *extra], tree=tree)
                    got[count] = (LAST_SECONDS[0], LAST_CPU_SECONDS[0])
                timed.setdefault(f"{name}_{variant}", []).append(got)
    n, n2 = args.face_clips, 2 * args.face_clips
    res["faces_clips_s"], res["faces_clips_per_cpu_s"] = {}, {}  # whole runs of --face-clips clips, best round
    res["faces_steady_clips_s"], res["faces_steady_clips_per_cpu_s"] = {}, {}  # the marginal rates, median round
    for key, rounds in timed.items():
        res["faces_clips_s"][key] = max(n / r[n][0] for r in rounds)
        res["faces_clips_per_cpu_s"][key] = max(n / r[n][1] for r in rounds)
        res["faces_steady_clips_s"][key] = statistics.median((n2 - n) / (r[n2][0] - r[n][0]) for r in rounds)
        res["faces_steady_clips_per_cpu_s"][key] = statistics.median((n2 - n) / (r[n2][1] - r[n][1]) for r in rounds)
    for name in runs:
        for what in ("faces_clips_s", "faces_clips_per_cpu_s", "faces_steady_clips_s", "faces_steady_clips_per_cpu_s"):
            rates = res[what]
            rates[f"{name}_onnx_over_torch"] = rates[f"{name}_onnx"] / rates[f"{name}_torch"]
            for base in res["baselines"]:  # this version's default (onnx on CPU) over the older one's
                rates[f"{name}_onnx_over_{base}"] = rates[f"{name}_onnx"] / rates[f"{name}_{base}"]
    _save(res, args.json)
    threads = tuple(sorted({1, os.cpu_count() or 1}))
    res["backends"] = backend_comparison(files[:4], threads, rounds=args.rounds)
    _save(res, args.json)
    res["box_carrying"] = box_carrying(files[:3], backend="onnx")
    _save(res, args.json)
    if not args.faces_only:  # batching is settled (bench/preprocess.json); --faces-only stays short
        res["face_batching"] = face_batching(files[:4])


if __name__ == "__main__":
    main()
