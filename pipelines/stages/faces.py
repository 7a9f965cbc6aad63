"""faces: MTCNN face boxes per face frame, a mask for frames without a face, square crops.

Frames stream in from the decoder and are batched across clips; one flush detects faces
on a batch (MTCNN from facenet-pytorch, weights from its wheel), crops them at the configured
size and margin as ``roi_align`` samples (``pipelines/stages/face_crops.py``), and hands the
crops to the face-feature extractor. MTCNN's own batched crop call raises when some frame
has no face, so we detect and crop ourselves. A frame without a face keeps its slot with mask 0 and a zero feature.

Box carrying (``detect_fps``): detect only at that rate and hold each box until the next
detection; faces in CREMA-D barely move. Downscaled detection (``detect_scale``): detect on
the frame resized by that factor, for large faces (CREMA-D's fill a third of the frame);
``min_face_size`` then counts the small frame's pixels. ``bench/preprocess.py`` measures the
speed-up and the box agreement of both against per-frame, full-size detection.

The cascade around the networks (image pyramid, candidates, NMS, box regression) is
``pipelines/stages/mtcnn_cascade.py``: facenet-pytorch's steps and box arithmetic, with the
pyramid and every candidate's crop resampled at once from a summed-area table instead of one
``interpolate`` call per candidate; boxes equal facenet-pytorch's ``MTCNN.detect`` up to float
rounding (``tests/test_mtcnn_cascade.py``).

Backends: ``torch`` runs facenet-pytorch's P-, R- and O-nets; ``onnx`` runs the same weights
(the wheel's ``data/*.pt``) exported to ONNX under ONNX Runtime, cached by their sha256
(``pipelines/stages/onnx_backend.py``; P-net with dynamic height and width for the image
pyramid). Both backends share the cascade, so they compute the same boxes up to float rounding.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from avbalance import shard_format as F
from pipelines.stages.base import STAGES, Stage, npy_bytes, stable_hash
from pipelines.stages.frames import pack_blobs, unpack_blobs

if TYPE_CHECKING:
    from pipelines.config import PreprocessConfig
    from pipelines.worker import ClipWork


# MTCNN's networks: example input, the axes that vary, output names (as facenet-pytorch's).
MTCNN_NETS = {
    "pnet": ((2, 3, 48, 64), {0: "n", 2: "h", 3: "w"}, ("reg", "prob")),  # runs on every pyramid level
    "rnet": ((2, 3, 24, 24), {0: "n"}, ("reg", "prob")),
    "onet": ((2, 3, 48, 48), {0: "n"}, ("reg", "landmarks", "prob")),
}


def export_mtcnn() -> dict[str, str]:
    """{net name: cached ONNX file}, exported from facenet-pytorch's weights on first use."""
    import facenet_pytorch
    import torch
    from facenet_pytorch.models import mtcnn as nets

    from avbalance.hashing import sha256_file
    from pipelines.stages.onnx_backend import exported

    data = os.path.join(os.path.dirname(facenet_pytorch.__file__), "data")
    paths = {}
    for name, (shape, dynamic, outputs) in MTCNN_NETS.items():
        identity = sha256_file(os.path.join(data, f"{name}.pt"))
        build = getattr(nets, name[0].upper() + "Net")  # PNet, RNet, ONet load the wheel's weights
        paths[name] = exported(f"mtcnn-{name}", identity, build, torch.rand(*shape), dynamic, outputs)
    return paths


@dataclass(frozen=True)
class FacesConfig:
    fps: float | None = None  # face frames per second; None = every frame
    detect_fps: float | None = None  # None = detect on every face frame; else carry boxes
    detect_scale: float = 1.0  # detect on the frame resized by this factor (min_face_size in its pixels)
    min_face_size: int = 40
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    margin: float = 0.2  # the square crop's side is max(w, h) * (1 + margin)
    size: int = 260  # EfficientNet-B2's input size; 224 also common

    def recorded(self) -> dict:
        """The settings as cache keys and shards.json record them: ``detect_scale`` only when
        it is not its default, so runs and shard sets of earlier versions stay valid."""
        config = dataclasses.asdict(self)
        if config["detect_scale"] == 1.0:
            del config["detect_scale"]
        return config
    keep_crops: bool = False  # also store the crops (JPEG) in the shards


@dataclass
class ClipFaces:
    """Per-clip accumulators; lists grow in slot order."""

    clip_id: str
    cached_boxes: np.ndarray | None = None  # (T, 4) from the cache: skip detection
    cached_mask: np.ndarray | None = None
    times: list[float] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    feats: list[np.ndarray] = field(default_factory=list)
    crops: list[bytes] = field(default_factory=list)
    detected: list[bool] = field(default_factory=list)
    last_box: np.ndarray | None = None
    last_prob: float = 0.0
    next_detect: float = 0.0


@STAGES.register("faces")
class FacesStage(Stage):
    """Runs in the worker's ``FaceBatcher``, which batches the face frames of a chunk's clips
    (and computes face_features from the same crops): the outputs come at the chunk's end."""

    version = 2  # 2: faceless clips are kept (all-zero mask); video_info as in frames
    inputs = ("video",)
    Config = FacesConfig
    rank = 30
    heavy = True

    @classmethod
    def cache_key(cls, config: FacesConfig, input_keys: dict[str, str]) -> str:
        return stable_hash(cls.name, cls.version, config.recorded(), [input_keys[i] for i in cls.inputs])

    @classmethod
    def export_models(cls, cfg: PreprocessConfig) -> None:
        if cfg.backend == "onnx":
            export_mtcnn()

    @classmethod
    def warm_up(cls, cfg: PreprocessConfig) -> None:
        import facenet_pytorch  # noqa: F401
        import timm  # noqa: F401

    @classmethod
    def start_worker(cls, cfg: PreprocessConfig, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))

    @classmethod
    def begin(cls, work: ClipWork) -> None:
        start_face_clip(work)

    @classmethod
    def compute(cls, work: ClipWork) -> None:
        return None  # at the chunk's end, once its face frames are batched

    @classmethod
    def finish(cls, work: ClipWork) -> dict[str, np.ndarray]:
        # A clip without a face is kept: all-zero mask and features, flagged no_face at pack.
        faces, _ = finish_face_clip(work)
        return {**faces, **work.video_info}

    @classmethod
    def abandon(cls, work: ClipWork) -> None:
        drop_face_clip(work)

    @classmethod
    def placeholder(cls, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
        """One face slot with mask 0."""
        config = cls.config_of(cfg)
        out = {"times": np.zeros(1, np.float32), "boxes": np.zeros((1, 4), np.float32), "probs": np.zeros(1, np.float32),
               "mask": np.zeros(1, np.uint8), "detected": np.zeros(1, np.uint8)}
        if config.keep_crops:
            out.update(crops_jpeg=np.zeros(0, np.uint8), crops_offsets=np.zeros(1, np.int64), crop_size=np.int64(config.size))
        return out

    @classmethod
    def pack(cls, out: dict[str, np.ndarray], clip: dict, pack_config) -> tuple[dict[str, bytes], dict]:
        from pipelines.stages.pack import jpeg_strip

        members = {F.FACE_MASK: npy_bytes(out["mask"].astype(np.uint8)), F.FACE_BOXES: npy_bytes(out["boxes"].astype(np.float32)),
                   F.FACE_TIMES: npy_bytes(out["times"].astype(np.float32))}
        meta = {"count": int(len(out["mask"])), "found": int(out["mask"].sum())}
        if "crops_jpeg" in out:
            found = iter(unpack_blobs(out["crops_jpeg"], out["crops_offsets"]))
            tiles = [next(found) if m else None for m in out["mask"]]  # black where no face
            members[F.FACES], meta["stride"] = jpeg_strip(tiles, pack_config.jpeg_quality, int(out["crop_size"]))
        return members, {"faces": meta}


# The face batcher of a worker process and a clip's place in it, shared by faces and face_features.
_BATCHER = "face_batcher"  # in work.resources: kept across the chunks of a process
_CLIP = "face_clip"  # in work.state: the clip's (faces, features) once finished, None before


def face_batcher(work: ClipWork) -> FaceBatcher:
    """This process's batcher, built on first use (with the feature extractor when
    face_features is selected)."""
    if _BATCHER not in work.resources:
        from pipelines.stages.face_features import FaceFeaturesStage
        from pipelines.stages.onnx_backend import resolve_backend

        cfg = work.cfg
        # The runner resolved "auto" already; a worker on another node checks onnxruntime is there.
        backend, threads = resolve_backend(cfg.backend, cfg.device), work.resources.get("threads")
        featurizer = (FaceFeaturesStage(cfg.face_features, cfg.device, backend, threads)
                      if FaceFeaturesStage.name in cfg.stages else None)
        work.resources[_BATCHER] = FaceBatcher(cfg.faces, featurizer, cfg.device, cfg.batch_size, backend, threads)
    return work.resources[_BATCHER]


def start_face_clip(work: ClipWork) -> None:
    """Queue the clip's face frames (once, whichever face stage asks first); with its faces
    cached, crop at their boxes and detect nothing."""
    if _CLIP in work.state:
        return
    batcher = face_batcher(work)
    clip_id = work.job.clip_id
    if FacesStage.name in work.job.todo:
        batcher.start_clip(clip_id)
    else:
        cached = work.input(FacesStage.name)
        batcher.start_clip(clip_id, cached["boxes"], cached["mask"])
    work.samplers.append(_face_sampler(work.cfg.faces.fps, batcher, clip_id))
    work.state[_CLIP] = None


def _face_sampler(fps: float | None, batcher: FaceBatcher, clip_id: str):
    from pipelines.stages.decode import FrameSampler

    return FrameSampler(fps, lambda slot, t, rgb: batcher.push(clip_id, slot, t, rgb))


def finish_face_clip(work: ClipWork) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The clip's (faces, features) once every queued frame is processed."""
    if work.state.get(_CLIP) is None:
        batcher = face_batcher(work)
        batcher.flush()
        work.state[_CLIP] = batcher.finish_clip(work.job.clip_id)
    return work.state[_CLIP]


def drop_face_clip(work: ClipWork) -> None:
    """Forget a clip whose decode failed (once)."""
    if work.state.pop(_CLIP, False) is None:
        batcher = face_batcher(work)
        batcher.flush()
        batcher.finish_clip(work.job.clip_id)


class FaceBatcher:
    """Collects face frames across clips; ``flush`` runs detection, cropping and features."""

    def __init__(self, cfg: FacesConfig, featurizer, device: str = "cpu", batch_size: int = 32,
                 backend: str = "torch", threads: int | None = None) -> None:
        from facenet_pytorch import MTCNN

        self.cfg = cfg
        self.featurizer = featurizer  # FaceFeaturesStage or None
        self.device = device
        self.batch_size = batch_size
        self.mtcnn = MTCNN(
            image_size=cfg.size, min_face_size=cfg.min_face_size, thresholds=list(cfg.thresholds),
            keep_all=True, device=device,
        )
        if backend == "onnx":
            import torch

            from pipelines.stages.onnx_backend import ort_module, session

            n = threads or torch.get_num_threads()
            for name, path in export_mtcnn().items():
                setattr(self.mtcnn, name, ort_module(session(path, n)))
        self.clips: dict[str, ClipFaces] = {}
        self.queue: list[tuple[ClipFaces, int, float, np.ndarray, bool]] = []

    def start_clip(self, clip_id: str, cached_boxes: np.ndarray | None = None, cached_mask: np.ndarray | None = None) -> None:
        self.clips[clip_id] = ClipFaces(clip_id, cached_boxes, cached_mask)

    def push(self, clip_id: str, slot: int, t: float, rgb: np.ndarray) -> None:
        clip = self.clips[clip_id]
        if self.queue and self.queue[-1][3].shape != rgb.shape:
            self.flush()  # MTCNN batches need one frame size
        detect = clip.cached_boxes is None and (
            self.cfg.detect_fps is None or t >= clip.next_detect - 1e-3
        )
        if detect and self.cfg.detect_fps is not None:
            clip.next_detect = (np.floor(t * self.cfg.detect_fps + 1e-3) + 1) / self.cfg.detect_fps
        self.queue.append((clip, slot, t, rgb, detect))
        if len(self.queue) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.queue:
            return
        queue, self.queue = self.queue, []
        detect_idx = [i for i, q in enumerate(queue) if q[4]]
        found: dict[int, tuple[np.ndarray | None, float]] = {}
        if detect_idx:
            boxes, probs = self.detect(np.stack([queue[i][3] for i in detect_idx]))
            for i, b, p in zip(detect_idx, boxes, probs):
                if b is None or len(b) == 0:
                    found[i] = (None, 0.0)
                else:
                    best = int(np.argmax(p))  # the most confident face
                    found[i] = (np.asarray(b[best], np.float32), float(p[best]))
        for i, (clip, slot, t, rgb, detect) in enumerate(queue):
            if clip.cached_boxes is not None:
                k = len(clip.times)
                has = bool(clip.cached_mask[k]) if k < len(clip.cached_mask) else False
                box, prob = (clip.cached_boxes[k], 1.0) if has else (None, 0.0)
            elif detect:
                box, prob = found[i]
                clip.last_box, clip.last_prob = box, prob
            else:
                box, prob = clip.last_box, clip.last_prob
            clip.times.append(t)
            clip.detected.append(detect)
            clip.mask.append(int(box is not None))
            clip.boxes.append(box if box is not None else np.zeros(4, np.float32))
            clip.probs.append(prob)
        self._crop_and_embed(queue)

    def detect(self, frames: np.ndarray) -> tuple[list, list]:
        """MTCNN on (N, H, W, 3) uint8 frames, on a copy resized by ``detect_scale`` if set
        (area interpolation); boxes in the full frame's pixels."""
        from pipelines.stages.mtcnn_cascade import detect

        def cascade(images: np.ndarray) -> tuple[list, list]:
            m = self.mtcnn
            return detect(images, m.pnet, m.rnet, m.onet, m.min_face_size, m.thresholds, m.factor, self.device)

        scale = self.cfg.detect_scale
        if scale == 1.0:
            return cascade(frames)
        import cv2

        h, w = frames.shape[1:3]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
        boxes, probs = cascade(small)
        sx, sy = w / size[0], h / size[1]
        return [None if b is None else b * np.array([sx, sy, sx, sy], np.float32) for b in boxes], probs

    def _crop_and_embed(self, queue) -> None:
        import torch

        from pipelines.stages.face_crops import crop_square

        rows = [(clip, k, rgb) for clip, k, rgb in self._positions(queue) if clip.mask[k]]
        if rows:
            # roi_align's crops (aligned, 2 x 2 samples a pixel), computed on each box's pixels only.
            crops = torch.stack([crop_square(rgb, self.square_box(clip.boxes[k]), self.cfg.size) for clip, k, rgb in rows])
            if self.featurizer is not None:
                out = self.featurizer.features(crops).numpy()
            for j, (clip, k, _) in enumerate(rows):
                if self.featurizer is not None:
                    clip.feats.append((k, out[j]))
                if self.cfg.keep_crops:
                    img = crops[j].clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG", quality=90)
                    clip.crops.append((k, buf.getvalue()))

    def _positions(self, queue):
        """(clip, index within the clip, frame) for each queued frame, in queue order."""
        counts: dict[str, int] = {}
        for clip, _, _, _, _ in queue:
            counts[clip.clip_id] = counts.get(clip.clip_id, 0) + 1
        seen: dict[str, int] = {}
        for clip, _, _, rgb, _ in queue:
            start = len(clip.times) - counts[clip.clip_id]
            k = start + seen.get(clip.clip_id, 0)
            seen[clip.clip_id] = seen.get(clip.clip_id, 0) + 1
            yield clip, k, rgb

    def square_box(self, box: np.ndarray) -> list[float]:
        x0, y0, x1, y1 = (float(v) for v in box)
        side = max(x1 - x0, y1 - y0) * (1 + self.cfg.margin)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]

    def finish_clip(self, clip_id: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """(faces arrays, face-feature arrays or None) for a clip whose frames are all flushed."""
        clip = self.clips.pop(clip_id)
        n = len(clip.times)
        faces = {
            "times": np.asarray(clip.times, np.float32),
            "boxes": np.asarray(clip.boxes, np.float32).reshape(n, 4),
            "probs": np.asarray(clip.probs, np.float32),
            "mask": np.asarray(clip.mask, np.uint8),
            "detected": np.asarray(clip.detected, np.uint8),
        }
        if self.cfg.keep_crops:
            data, offsets = pack_blobs([jpg for _, jpg in sorted(clip.crops, key=lambda kv: kv[0])])
            faces["crops_jpeg"], faces["crops_offsets"] = data, offsets
            faces["crop_size"] = np.int64(self.cfg.size)
        feats = None
        if self.featurizer is not None:
            arr = np.zeros((n, 1408), np.float16)
            for k, f in clip.feats:
                arr[k] = f
            feats = {"feats": arr}
        return faces, feats
