"""Optical-flow stage speed and accuracy per DIS preset, on UCF-101-sized frames (320 x 240).

    python bench/flow.py [--fields 50] [--out bench/flow.json]

A smooth random texture moves (3, -2) px a frame; for each preset the script feeds frames
to the flow stage (one field per frame: rate = fps, stack 1), times it (gray conversion, DIS,
quantisation and the two JPEG strips) and reports CPU ms per field and the median end-point
error of the decoded fields in the frame's interior. One thread (OpenCV's pool set to 1),
as one preprocess worker per core runs it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.stages.flow import PRESETS, FlowConfig, FlowStage, dequantise  # noqa: E402

H, W, DX, DY = 240, 320, 3, -2


def frames(n: int) -> list[np.ndarray]:
    pad = 4 * n + 8
    base = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (H + 2 * pad, W + 2 * pad)).astype(np.uint8), (0, 0), 2.0)
    out = []
    for i in range(n):
        x0, y0 = pad - DX * i, pad - DY * i
        out.append(np.repeat(base[y0:y0 + H, x0:x0 + W, None], 3, axis=2))
    return out


def run(preset: str, clip: list[np.ndarray]) -> dict:
    fps = 25.0
    stage = FlowStage(FlowConfig(rate=fps, stack=1, preset=preset))
    start = time.process_time()  # CPU time: a shared machine does not inflate it
    for i, rgb in enumerate(clip):
        stage.add(i, i / fps, rgb)
    stage.close(1 / fps)
    out = stage.finish_clip()
    seconds = time.process_time() - start
    stride = int(out["stride"])
    xs = np.asarray(Image.open(io.BytesIO(out["x_strip"].tobytes())))
    ys = np.asarray(Image.open(io.BytesIO(out["y_strip"].tobytes())))
    errors = []
    for k in range(len(clip) - 1):  # the last slot has no following frame
        fx = dequantise(xs[32:-32, k * stride + 32:k * stride + W - 32], 20.0)
        fy = dequantise(ys[32:-32, k * stride + 32:k * stride + W - 32], 20.0)
        errors.append(float(np.median(np.hypot(fx - DX, fy - DY))))
    return {"cpu_ms_per_field": round(1000 * seconds / len(clip), 2), "median_epe_px": round(float(np.median(errors)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=50, help="flow fields per preset (default 50)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "flow.json"),
                        help="result file (default bench/flow.json)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    clip = frames(args.fields)
    result = {"setup": {"frame": [W, H], "motion_px": [DX, DY], "fields": args.fields, "threads": 1,
                        "opencv": cv2.__version__},
              "presets": {p: run(p, clip) for p in PRESETS}}
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(json.dumps(result["presets"], indent=2))


if __name__ == "__main__":
    main()
