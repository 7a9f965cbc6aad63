"""The ONNX Runtime backend of the face stages: export once, cache by weights, run on CPU.

A network is exported from the very weights the torch path loads, at run time, into
``<cache dir>/onnx/<name>-<hash>.onnx``; the hash covers the weights' sha256, the export
settings and the torch/onnx versions, so a re-run (or another output folder) reuses the file
and new weights get a new one. The cache dir is ``$AVBALANCE_CACHE_DIR``, else
``$XDG_CACHE_HOME/avbalance``, else ``~/.cache/avbalance``. Files are written under a
temporary name and renamed, so a reader never sees half a file, and under a lock
(``.<name>-<hash>.lock`` beside it): of the workers or runs that need one export at once, one
exports and the others wait for it and reuse it.

The backend is not part of a stage's cache key: the ONNX outputs match torch's within the
tolerances the tests check (features 1e-3 max abs, boxes 1 px), like ``--device``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

from avbalance.errors import UserError
from pipelines.stages.base import stable_hash

if TYPE_CHECKING:
    import onnxruntime
    import torch

BACKENDS = ("torch", "onnx")
EXPORT_VERSION = 1  # bump when the export itself changes (new graph for the same weights)
# Whether ONNX Runtime's idle threads spin (busy-wait) between ops. Off: on a shared 2-core
# machine spinning threads took cores from the other jobs and from each other (MTCNN and
# EfficientNet-B2 slower at 2 threads, the same at 1); bench/preprocess.py --faces-only measures
# both settings in one invocation (``backends``, key ``spinning``).
SPINNING = False


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: str) -> str:
    """``--backend``'s value, with ``auto`` (the default) resolved: ONNX Runtime on CPU when it
    is installed (bench/preprocess.py --faces-only compares the two), torch otherwise and on CUDA."""
    if backend == "auto":
        return "onnx" if device == "cpu" and onnx_available() else "torch"
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend} is not known; choose from auto, {', '.join(BACKENDS)}")
    if backend == "onnx":
        if not onnx_available():
            raise UserError("--backend onnx needs onnxruntime and onnxscript (pip install onnxruntime onnx "
                            "onnxscript, pinned in pyproject.toml); or use --backend torch")
        if device != "cpu":
            raise UserError(f"--backend onnx runs on the CPU only (onnxruntime's CPU package); with --device {device} "
                            "use --backend torch")
    return backend


def cache_dir() -> str:
    """Where exported networks are kept (see the module docstring)."""
    base = os.environ.get("AVBALANCE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "avbalance")
    return os.path.join(base, "onnx")


def exported(name: str, identity: str, build: Callable[[], torch.nn.Module], example: torch.Tensor,
             dynamic: dict[int, str], outputs: Sequence[str]) -> str:
    """The path of ``name``'s ONNX file for weights ``identity``; exported on first use.

    ``build`` makes the torch module (only called when the file is missing); ``example`` is an
    input of the right rank; ``dynamic`` names its axes that vary (e.g. ``{0: "n"}``).
    """
    import onnx
    import torch

    key = stable_hash(name, identity, EXPORT_VERSION, sorted(dynamic.items()), torch.__version__, onnx.__version__)
    folder = cache_dir()
    path = os.path.join(folder, f"{name}-{key[:16]}.onnx")
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        lock = os.open(os.path.join(folder, f".{name}-{key[:16]}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _unwritable(folder, err) from None
    try:
        # One process exports; the others (preprocess workers, concurrent runs) wait and reuse it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(path):
            _export(path, folder, name, build, example, dynamic, outputs)
    finally:
        os.close(lock)  # releases the lock
    return path


def _unwritable(folder: str, err: OSError) -> UserError:
    return UserError(f"cannot write the ONNX export cache {folder} ({err}); set AVBALANCE_CACHE_DIR to a "
                     "writable folder, or use --backend torch")


def _export(path: str, folder: str, name: str, build: Callable[[], torch.nn.Module], example: torch.Tensor,
            dynamic: dict[int, str], outputs: Sequence[str]) -> None:
    import torch

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".onnx", dir=folder)
        os.close(fd)
    except OSError as err:
        raise _unwritable(folder, err) from None
    from torch.export import Dim

    shapes = ({axis: Dim(label, min=12 if label in ("h", "w") else 1) for axis, label in dynamic.items()},)
    try:
        # The exporter prints progress and warns about its own internals: keep the CLI quiet.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(build().eval(), (example,), None, input_names=["x"], output_names=list(outputs),
                                        dynamic_shapes=shapes, dynamo=True, verbose=False)
            program.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as any other
        os.replace(tmp, path)  # atomic: a racing worker sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def session(path: str, threads: int, spinning: bool | None = None) -> onnxruntime.InferenceSession:
    """A CPU session with ``threads`` intra-op threads (cores / workers, as torch gets) and
    every graph optimisation; one inter-op thread, as the graphs are sequential. ``spinning``
    (default ``SPINNING``) lets idle threads busy-wait for the next op."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    spin = "1" if (SPINNING if spinning is None else spinning) else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_module(sess: onnxruntime.InferenceSession) -> torch.nn.Module:
    """A torch module that runs ``sess``: a drop-in for a network that code such as
    facenet-pytorch calls with tensors (it reads the dtype off a parameter, hence the dummy)."""
    import torch

    class OrtModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dtype_probe = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outs = sess.run(None, {"x": x.detach().float().contiguous().numpy()})
            return tuple(torch.from_numpy(o) for o in outs)

    return OrtModule()
