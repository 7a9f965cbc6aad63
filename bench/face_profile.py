"""Where the face stages' CPU time goes, per backend: one thread, the decoded frames of a few
synthetic clips pushed through the stages' own ``FaceBatcher`` (MTCNN, crops, EfficientNet-B2),
profiled with cProfile. Video decoding, model loading and cache writes are left out: this is
the per-frame work the backends share or differ in.

    python bench/face_profile.py --clips 2 --json bench/face_profile.json

Reports CPU ms per face frame and the cumulative time of: MTCNN as a whole, its image
resampling (the pyramid and every candidate box's crop resized for R-net and O-net),
EfficientNet-B2 (``features``) and the face crops, per backend (torch, ONNX Runtime).

``--baseline REF`` (repeatable) profiles the stage code of that git revision too, in a
subprocess that imports its ``pipelines`` package (with its default backend): the per-frame
work as it was, e.g. before the stage's own MTCNN cascade (``pipelines/stages/mtcnn_cascade.py``)
and crops (``pipelines/stages/face_crops.py``) replaced facenet-pytorch's ``MTCNN.detect``
(one ``interpolate`` call per candidate box) and ``roi_align`` on whole frames.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PARTS = {  # (file suffix, function name) -> label; cumulative seconds (the functions of a label do not nest)
    ("facenet_pytorch/models/mtcnn.py", "detect"): "mtcnn",
    ("pipelines/stages/mtcnn_cascade.py", "detect"): "mtcnn",
    ("facenet_pytorch/models/utils/detect_face.py", "imresample"): "mtcnn_resampling",
    ("pipelines/stages/mtcnn_cascade.py", "summed_area"): "mtcnn_resampling",
    ("pipelines/stages/mtcnn_cascade.py", "resize_area"): "mtcnn_resampling",
    ("pipelines/stages/mtcnn_cascade.py", "resample_boxes"): "mtcnn_resampling",
    ("pipelines/stages/face_features.py", "features"): "efficientnet",
    ("torchvision/ops/roi_align.py", "roi_align"): "crops",
    ("pipelines/stages/face_crops.py", "crop_square"): "crops",
}


def frames_of(clips: int, work: str) -> list[list]:
    import av

    corpus = os.path.join(work, "corpus")
    if not os.path.exists(os.path.join(corpus, "synth.json")):
        subprocess.run([sys.executable, os.path.join(REPO, "cli.py"), "synth", "cremad", "--out", corpus,
                        "--actors", "1", "--sentences", "2"], check=True, stdout=subprocess.DEVNULL)
    out = []
    for path in sorted(glob.glob(os.path.join(corpus, "VideoFlash", "*")))[:clips]:
        with av.open(path) as container:
            out.append([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return out


def profile(backend: str | None, clips: list[list]) -> dict:
    """``backend`` None: the stage classes as they are, without backend options (an older
    revision's, which ran torch)."""
    from pipelines.stages.face_features import FaceFeaturesConfig, FaceFeaturesStage
    from pipelines.stages.faces import FaceBatcher, FacesConfig

    options = () if backend is None else (backend, 1)
    featurizer = FaceFeaturesStage(FaceFeaturesConfig(allow_random=True, weights_sha256="random-init-seed0"), "cpu", *options)
    batcher = FaceBatcher(FacesConfig(), featurizer, "cpu", 32, *options)

    def run() -> None:
        for i, frames in enumerate(clips):
            batcher.start_clip(str(i))
            for k, rgb in enumerate(frames):
                batcher.push(str(i), k, k / 30, rgb)
            batcher.flush()
            batcher.finish_clip(str(i))

    run()  # warm: first calls allocate and pick kernels
    n = sum(len(f) for f in clips)
    start = time.process_time()
    run()
    ms = (time.process_time() - start) / n * 1000
    prof = cProfile.Profile()
    prof.runcall(run)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    total = sum(v[2] for v in stats.values())
    parts = {label: 0.0 for label in PARTS.values()}
    for (path, _, name), v in stats.items():
        for (suffix, fn), label in PARTS.items():
            if name == fn and path.endswith(suffix):
                parts[label] += v[3]
    return {"cpu_ms_per_frame": ms, "frames": n, "share": {k: v / total for k, v in parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "avbalance-bench-face-profile"))
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--baseline", action="append", default=[], metavar="REF",
                    help="also profile the stage code of this git revision (its default backend)")
    ap.add_argument("--code", help=argparse.SUPPRESS)  # internal: profile the pipelines package of this checkout
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("AVBALANCE_CACHE_DIR", os.path.join(args.work, "cache"))  # ONNX exports
    if args.code:  # a baseline's subprocess: its stage code, its default backend, JSON on stdout
        sys.path.insert(0, args.code)
        json.dump(profile(None, frames_of(args.clips, args.work)), sys.stdout)
        return
    clips = frames_of(args.clips, args.work)
    res = {}
    for ref in args.baseline:
        from bench.ray_engine import tree_of

        tree = tree_of(ref, args.work)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--clips", str(args.clips), "--work", args.work,
                              "--code", tree], check=True, capture_output=True, text=True).stdout
        res[os.path.basename(tree).replace("tree-", "at_")] = json.loads(out)
    res["baselines"] = list(res)
    res.update({backend: profile(backend, clips) for backend in ("torch", "onnx")})
    res["onnx_over_torch"] = res["torch"]["cpu_ms_per_frame"] / res["onnx"]["cpu_ms_per_frame"]
    for base in res["baselines"]:
        res[f"onnx_over_{base}"] = res[base]["cpu_ms_per_frame"] / res["onnx"]["cpu_ms_per_frame"]
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
