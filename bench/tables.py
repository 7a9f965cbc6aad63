"""docs/benchmarks.md's generated tables: each is rendered from a benchmark's JSON alone, so a
figure in the docs is what the named command measured, never typed by hand.

A block in a markdown file::

    <!-- bench-table:begin bench/train.json loader -->
    ...exactly what the ``loader`` renderer prints for bench/train.json...
    <!-- bench-table:end -->

``python bench/tables.py docs/benchmarks.md`` rewrites every block; ``--check`` exits 1 when
one is stale (``tests/test_bench_tables.py`` runs the check).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python bench/tables.py`: the renderers import bench.*
    sys.path.insert(0, REPO)
BLOCK = re.compile(r"(<!-- bench-table:begin (?P<path>\S+) (?P<name>\S+) -->\n)(?P<body>.*?)(<!-- bench-table:end -->)", re.S)
RENDERERS: dict[str, Callable[[dict], str]] = {}
LOADER_FLOOR_TARGET = 0.80  # issue 14: the shard loader at >= 80 % of the decode floor
LOADER_OGM_TARGET = 2.0  # issue 14: >= 2x the OGM-style per-sample loader


def renderer(name: str):
    def register(fn: Callable[[dict], str]) -> Callable[[dict], str]:
        RENDERERS[name] = fn
        return fn

    return register


def _verdict(value: float, target: float) -> str:
    return "met" if value >= target else "not met"


@renderer("loader")
def loader_table(data: dict) -> str:
    """bench/train.py's loader comparison: rates, ratios and the issue's targets."""
    d = data["loader"]
    wall, cpu = d["samples_per_s"], d["samples_per_cpu_s"]
    rows = [("OGM-style per-sample loader (rebuilt in the bench)", "ogm_style"),
            ("decode floor: strip decode + cut only", "decode_floor"),
            ("**shards** (`trainer/loader.py`), uint8 batches to the device", "shards"),
            ("shards, normalised on the CPU (a CPU-only run)", "shards_normalised_on_cpu")]
    out = ["| loader | samples/s (wall) | samples per CPU-second | vs OGM-style (CPU) | vs floor (CPU) |",
           "|---|--:|--:|--:|--:|"]
    for label, key in rows:
        out.append(f"| {label} | {wall[key]:.1f} | {cpu[key]:.1f} | {cpu[key] / cpu['ogm_style']:.2f}x | "
                   f"{cpu[key] / cpu['decode_floor']:.2f} |")
    ogm, floor = d["cpu_ratios"]["shards_over_ogm_style"], d["cpu_ratios"]["shards_over_floor"]
    out += ["", f"{d['clips']} clips, {d['frames']} frames at {d['image']} px, batch {d['batch']}, {d['workers']} loader "
                f"workers each, {d['epochs_per_round']} epochs a round, best of {d['rounds']} interleaved rounds; load "
                f"average {d['load_average_at_end']:.1f} at the end. Targets, per CPU-second: shards ≥ "
                f"{LOADER_OGM_TARGET:.0f}x the OGM-style loader: **{ogm:.2f}x, {_verdict(ogm, LOADER_OGM_TARGET)}** "
                f"({d['wall_ratios']['shards_over_ogm_style']:.2f}x in wall time); shards ≥ "
                f"{LOADER_FLOOR_TARGET:.0%} of the decode floor: **{floor:.0%}, {_verdict(floor, LOADER_FLOOR_TARGET)}** "
                f"({d['wall_ratios']['shards_over_floor']:.0%} in wall time). One H100 (derived, below) needs about "
                f"**{d['cores_for_one_h100']:.0f} cores** of loader workers at "
                f"{cpu['shards']:.0f} samples per CPU-second."]
    return "\n".join(out) + "\n"


@renderer("decode")
def decode_table(data: dict) -> str:
    """bench/train.py's strip decode costs (CPU time, one thread)."""
    d = data["decode"]
    ms = d["ms_per_strip"]
    labels = {"pil": "PIL open + RGB convert + array (the old loader)", "torchvision": "torchvision `decode_jpeg` (the loader now)",
              "pil_draft_half": "PIL draft, 1/2 size (DCT scaling)", "pil_draft_quarter": "PIL draft, 1/4 size"}
    out = ["| decoder | CPU ms per strip | vs PIL |", "|---|--:|--:|"]
    out += [f"| {labels[k]} | {ms[k]:.2f} | {ms['pil'] / ms[k]:.2f}x |" for k in labels if k in ms]
    unused = d["unused_columns"]
    out += ["", f"{d['strips']} strips, best of 3. Strip columns a clip leaves unused: {unused['frames_3']:.0%} at "
                f"`data.frames=3`, {unused['frames_1']:.0%} at `data.frames=1`."]
    return "\n".join(out) + "\n"


@renderer("handover")
def handover_table(data: dict) -> str:
    """bench/train.py's cost of handing a batch to the main process, in the worker."""
    d = data["handover"]
    ms = d["ms_per_batch"]
    labels = {"fresh_segment": "a fresh shared-memory segment per batch (the loader before the pool)",
              "pool_slot": "a reused pool slot (`trainer/batch_pool.py`, the loader now)",
              "heap": "ordinary memory (no process boundary: the floor)"}
    out = ["| a worker stacks the batch into | CPU ms per batch | vs pool slot |", "|---|--:|--:|"]
    out += [f"| {labels[k]} | {ms[k]:.2f} | {ms[k] / ms['pool_slot']:.2f}x |" for k in labels if k in ms]
    out += ["", f"{d['batch']} samples, {d['mb_per_batch']:.1f} MB of uint8 frames a batch; CPU time, best of 3 rounds of 50."]
    return "\n".join(out) + "\n"


FACE_TARGET = 2.0  # issue 14: face stages on CPU at least 2x faster end to end


@renderer("faces")
def faces_table(data: dict) -> str:
    """bench/preprocess.py --faces-only: both face stages per backend end to end, each
    network alone, downscaled detection and box carrying, the full-CREMA-D estimate."""
    base = (data.get("baselines") or [None])[0]  # an older revision as it ran by default (torch)
    names = ([base] if base else []) + ["torch", "onnx"]
    label_of = {"torch": "torch", "onnx": "onnx", **({base: f"`{base.removeprefix('at_')}`"} if base else {})}
    ratios = [("onnx", "torch")] + ([("onnx", base)] if base else [])
    head = ([f"{label_of[n]} clips/s" for n in names] + [f"{label_of[a]}/{label_of[b]} (wall)" for a, b in ratios]
            + [f"{label_of[n]} clips per CPU-s" for n in names] + [f"{label_of[a]}/{label_of[b]} (CPU)" for a, b in ratios])
    out = ["| run | " + " | ".join(head) + " |", "|---|" + "--:|" * len(head)]
    steady = "faces_steady_clips_s" in data
    kinds = [("faces_clips_s", "faces_clips_per_cpu_s", f"whole run of {data['face_clips']} clips" if "face_clips" in data else "whole run")]
    if steady:
        kinds.append(("faces_steady_clips_s", "faces_steady_clips_per_cpu_s", "steady state"))
    for key, label in (("every_frame", "every frame"), ("fps5", "`--face-fps 5`")):
        for wall_key, cpu_key, kind in kinds:
            cells = []
            for rates in (data[wall_key], data[cpu_key]):
                cells += [f"{rates[f'{key}_{n}']:.3f}" for n in names] + [f"{rates[f'{key}_{a}_over_{b}']:.2f}x" for a, b in ratios]
            out.append(f"| {label}, {kind} | " + " | ".join(cells) + " |")
    against = base or "torch"  # the "today": the older revision when measured, else this torch path
    key = f"every_frame_onnx_over_{against}"
    wall, cpu = (data["faces_steady_clips_s"], data["faces_steady_clips_per_cpu_s"]) if steady else (data["faces_clips_s"], data["faces_clips_per_cpu_s"])
    best = min(wall[key], cpu[key])  # met only if both are
    out += ["", f"Target: every frame at least {FACE_TARGET:.0f}x faster end to end: **{_verdict(best, FACE_TARGET)}** "
                f"(ONNX Runtime over {label_of[against]}, every frame{', steady state' if steady else ''}: {wall[key]:.2f}x wall, "
                f"{cpu[key]:.2f}x per CPU-second"
                + (f"; whole run of {data['face_clips']} clips: {data['faces_clips_s'][key]:.2f}x wall, "
                   f"{data['faces_clips_per_cpu_s'][key]:.2f}x per CPU-second" if steady else "") + ")."]
    nets = {"mtcnn": "MTCNN (frames)", "effnet_b1": "EfficientNet-B2, batch 1 (crops)", "effnet_b4": "EfficientNet-B2, batch 4 (crops)",
            "effnet_b8": "EfficientNet-B2, batch 8 (crops)"}
    rows: dict = {}
    for r in data.get("backends", []):
        backend = r["backend"] + ("" if r["backend"] == "torch" else (", spinning" if r.get("spinning") else ""))
        rows.setdefault((r["what"], r["threads"]), {})[backend] = r
    if rows:
        out += ["", "| network | threads | torch /s | onnx /s | onnx, spinning /s | torch per CPU-s | onnx per CPU-s | "
                    "onnx/torch (CPU) |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
        for (what, threads), by in sorted(rows.items(), key=lambda kv: (list(nets).index(kv[0][0]) if kv[0][0] in nets else 9, kv[0][1])):
            if "torch" not in by or "onnx" not in by:
                continue
            t, o, spin = by["torch"], by["onnx"], by.get("onnx, spinning")
            spinning = f"{spin['per_s']:.1f}" if spin else "–"
            out.append(f"| {nets.get(what, what)} | {threads} | {t['per_s']:.1f} | {o['per_s']:.1f} | {spinning} | "
                       f"{t['per_cpu_s']:.1f} | {o['per_cpu_s']:.1f} | {o['per_cpu_s'] / t['per_cpu_s']:.2f}x |")
    boxes = data.get("box_carrying", [])
    if boxes:
        out += ["", "| detection | speed-up | box IoU mean | 5th pct | min |", "|---|--:|--:|--:|--:|"]
        for b in boxes:
            what = f"every {1 / b['detect_fps']:.1f} s of video (`--face-detect-fps {b['detect_fps']:g}`)" if "detect_fps" in b \
                else f"downscaled to {b['detect_scale']:g} (`--face-detect-scale`), faces found {b['faces_found']} of {b['faces_full_size']}"
            out.append(f"| {what} | {b['speedup']:.2f}x | {b['iou_mean']:.3f} | {b['iou_p05']:.3f} | {b['iou_min']:.3f} |")
    hours = data.get("estimate_cremad_hours", {})
    if hours:
        out += ["", "Full CREMA-D (7,442 clips) on this machine at the steady-state wall rates, hours: " + ", ".join(
            f"{k.removeprefix('faces_').replace('_', ' ')} {v:.1f}" for k, v in sorted(hours.items())) + "."]
    out += ["", f"{data['clips']} corpus clips, {data['workers']} workers, {data['cpu']} CPUs."]
    return "\n".join(out) + "\n"


@renderer("face_profile")
def face_profile_table(data: dict) -> str:
    """bench/face_profile.py: CPU ms per face frame and where it goes, per backend."""
    labels = {"mtcnn": "MTCNN, all of it", "mtcnn_resampling": "of which image resampling (pyramid, candidate boxes)",
              "efficientnet": "EfficientNet-B2", "crops": "face crops"}
    columns = [(k, f"`{k.removeprefix('at_')}` (torch)") for k in data.get("baselines", [])] + [("torch", "torch"), ("onnx", "onnx")]
    out = ["| | " + " | ".join(name for _, name in columns) + " |", "|---|" + "--:|" * len(columns),
           "| CPU ms per face frame (1 thread) | " + " | ".join(f"{data[k]['cpu_ms_per_frame']:.1f}" for k, _ in columns) + " |"]
    out += [f"| {label} | " + " | ".join(f"{data[k]['share'][part]:.0%}" for k, _ in columns) + " |" for part, label in labels.items()]
    note = f"ONNX Runtime over torch on this per-frame work: **{data['onnx_over_torch']:.2f}x**"
    for base in data.get("baselines", []):
        note += f"; over `{base.removeprefix('at_')}`: **{data[f'onnx_over_{base}']:.2f}x**"
    out += ["", f"{data['torch']['frames']} face frames; shares of the profiled time (cProfile, cumulative); {note}."]
    return "\n".join(out) + "\n"


@renderer("cremad_estimate")
def cremad_estimate_table(data: dict) -> str:
    """bench/preprocess.py's full-CREMA-D estimate (7,442 clips) from its measured rates."""
    hours = data["estimate_cremad_hours"]
    labels = {"frames_audio_pack": "frames + audio + pack", "faces_every_frame": "faces + face features, every frame (the Conformer setup)",
              "faces_5fps": "faces + face features at `--face-fps 5`",
              "faces_every_frame_onnx": "faces + face features, every frame (the Conformer setup), ONNX Runtime",
              "faces_fps5_onnx": "faces + face features at `--face-fps 5`, ONNX Runtime"}
    out = ["| stages | hours |", "|---|--:|"]
    out += [f"| {label} | {hours[k]:.2f} |" if hours[k] < 1 else f"| {label} | {hours[k]:.1f} |" for k, label in labels.items() if k in hours]
    return "\n".join(out) + "\n"


@renderer("ray_engine")
def ray_engine_table(data: dict) -> str:
    """bench/preprocess.py --engine ray (bench/ray_engine.py): local vs Ray, per engine row."""
    from bench.ray_engine import render

    return render(data.get("engine_ray", data)) + "\n"


# Blocks whose JSON may not exist yet: their renderer is called with None and says so.
OPTIONAL = {"gpu_check"}


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        value = f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value}{unit}"


def _gpu_row(name: str, r: dict) -> str:
    """One item of bench/gpu_check.py: what it measured, in a line."""
    if r["status"] != "ok":
        error_lines = (r.get("error") or "").strip().splitlines()
        why = r.get("reason") or (error_lines[-1] if error_lines else "")
        return f"| {name} | {r['status']} | {why.replace('|', '/')} |"
    if name.startswith("resnet") or name == "conformer_w2v":
        parts = [f"{_fmt(r['samples_per_s'])} samples/s", f"GPU busy {_fmt(r.get('gpu_busy_pct'), ' %')}"]
        if "peak_memory_gib" in r:
            parts.append(f"peak {_fmt(r['peak_memory_gib'], ' GiB')}")
    elif name in ("bf16_vs_fp32", "compile"):
        parts = [f"{r['steps']} steps, {' vs '.join(r['pair'])}: moving averages within {_fmt(r['max_moving_average_gap'])} "
                 f"(tolerance {r['tolerance']}): agree {_fmt(r['agree'])}",
                 f"speed-up {_fmt(r.get('bf16_speedup', r.get('speedup')))}x"]
        if name == "compile":
            parts.append(f"first step {r['first_step_seconds'][1]} s ({r['backend']})")
    elif name == "jpeg_decode":
        parts = [f"cpu {_fmt(r['samples_per_s_cpu'])} vs cuda {_fmt(r['samples_per_s_cuda'])} samples/s",
                 f"mean diff {_fmt(r['mean_abs_levels'])} levels: equal {_fmt(r['equal_within_tolerance'])}"]
    elif name == "faces":
        parts = [f"{_fmt(r['clips_per_s_candidate'])} clips/s, {_fmt(r['frames_per_s_candidate'])} frames/s "
                 f"({r['args_candidate']}) vs {_fmt(r['frames_per_s_reference'])} frames/s ({r['args_reference']})",
                 f"features within {_fmt(r['max_feature_gap'])}, boxes within {_fmt(r['max_box_gap_px'])} px: "
                 f"equal {_fmt(r['equal_within_tolerance'])}"]
    elif name == "ddp":
        parts = [f"one epoch in {_fmt(r['seconds'])} s, backend {r['backend']}"]
    else:
        parts = [f"{_fmt(r.get('clips'))} clips" if "clips" in r else ""]
    return f"| {name} | ok | {'; '.join(p for p in parts if p)} |"


@renderer("gpu_check")
def gpu_check_table(data: dict | None) -> str:
    """bench/gpu_check.py (`make gpu-check`): one line per item, with the device it ran on."""
    if data is None:
        return ("Unmeasured: no GPU machine has been lent to a task yet. `make gpu-check` measures every item "
                "below on the first one and fills this table from `bench/gpu.json`.\n")
    head = f"Device: {data.get('device_name')} (torch {data.get('torch')}, CUDA {data.get('cuda', 'none')}), " \
           f"{data.get('mode')} mode, {data.get('started')}, {data.get('total_seconds')} s in all."
    if data.get("device_type") != "cuda" or data.get("mode") != "full":
        head += " **Not GPU figures**: this JSON comes from a CPU or smoke run."
    rows = ["| item | status | result |", "|---|---|---|"]
    rows += [_gpu_row(name, r) for name, r in data.get("items", {}).items()]
    return head + "\n\n" + "\n".join(rows) + "\n"


@renderer("sweep_engines")
def sweep_engines_table(data: dict) -> str:
    """bench/sweep_engines.py: the Ray sweep engine's fixed and per-run cost against local."""
    run_s, local, ray = data["run_s"], data["local"], data["ray"]
    rows = ["| | local | ray |", "|---|--:|--:|",
            f"| whole sweep of {data['runs']} runs, one at a time (s) | {local['sweep_s']:.1f} | {ray['sweep_s']:.1f} |",
            f"| fixed cost: start + shutdown (s) | – | {ray['start_s']:.2f} + {ray['shutdown_s']:.2f} = {ray['fixed_s']:.2f} "
            f"({ray['fixed_ratio']:.2f} × a run) |",
            f"| overhead per run (s) | {local['per_run_overhead_s']:.3f} ({100 * local['per_run_overhead_ratio']:.2f} %) | "
            f"{ray['per_run_overhead_s']:.3f} ({100 * ray['per_run_overhead_ratio']:.2f} %) |"]
    verdict = "met" if data["meets_target"] else "not met"
    return ("\n".join(rows) + f"\n\nA run takes {run_s:.2f} s (median); Ray's per-run overhead is "
            f"{100 * ray['per_run_overhead_ratio']:.2f} % of it (target ≤ {100 * data['target_per_run_ratio']:.0f} %: "
            f"{verdict}); the runs' test accuracies are {'the same' if data['same_accuracies'] else 'NOT the same'} "
            f"on both engines. {data['rounds']} rounds, medians; load average {data['machine']['load_1min']} "
            f"on {data['machine']['cpus']} CPUs.\n")


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(json path, renderer name, current body) of each block in ``text``."""
    return [(m["path"], m["name"], m["body"]) for m in BLOCK.finditer(text)]


def render(path: str, name: str) -> str:
    full = os.path.join(REPO, path)
    if name in OPTIONAL and not os.path.exists(full):
        return RENDERERS[name](None)
    with open(full, encoding="utf-8") as fh:
        return RENDERERS[name](json.load(fh))


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m["path"], m["name"]) + m.group(5), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--check", action="store_true", help="exit 1 when a block differs from what its JSON renders")
    args = ap.parse_args(argv)
    stale = []
    for file in args.files:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
        new = rewrite(text)
        if new != text:
            if args.check:
                stale += [f"{file}: {p} {n}" for p, n, body in blocks(text) if body != render(p, n)]
            else:
                with open(file, "w", encoding="utf-8") as fh:
                    fh.write(new)
    for line in stale:
        print(f"stale: {line} (run `python bench/tables.py {line.split(':')[0]}`)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
