"""``relearning``: Diagnosing & Re-learning (Wei, Li & Hu, "Diagnosing and Re-learning for
Balanced Multimodal Learning", ECCV 2024).

Instead of modulating gradients every step, the method periodically *diagnoses* how well
each uni-modal encoder has learnt, from the separability of its representation, and softly
re-initialises the encoders that have learnt "too well" so they stop crowding out the rest:

    z_m(x)   = out.features[m], the encoder's output, on the training and validation sets
    P_m^tr   = purity(k-means(minmax(z_m(train)), C clusters), train labels)
    P_m^val  = purity(k-means(minmax(z_m(val)),   C clusters), val labels)
    alpha_m  = tanh(lambda * |P_m^tr - P_m^val|)
    theta_m <- alpha_m * theta_m^0 + (1 - alpha_m) * theta_m            (encoder m only)

purity(clusters, y) = (1/N) sum_c max_y |{i in c : y_i = y}|. A modality whose training
representation separates the classes much better than its validation representation is
memorising (over-trained, typically the dominant one) and is pulled back towards its initial
weights theta^0; a modality that has learnt little keeps its weights. The loss between
diagnoses is plain CE on the fused logits.

What comes from the paper: clustering purity of the uni-modal representation as the
learning-state diagnosis, a tanh-bounded re-initialisation strength, and the soft
re-initialisation towards the encoder's initial weights. Checked against the authors' code,
GeWu-Lab/Diagnosing_Relearning_ECCV2024 ``code/ours.py`` (``reinit_score``, ``reinit``,
``purity_score`` and the loop in ``main``): lambda 3 (``--move_lambda``), after every 20
epochs (``--reinit_epoch``), at most 3 times (``--reinit_num``), MinMax scaling to [-1, 1]
and ``KMeans(n_clusters=C, random_state=0)`` with scikit-learn's n_init of the time (10;
scikit-learn 1.4 changed the default to "auto", i.e. 1).

Choices:

- Timing: the reference re-initialises after training and validating (0-based) epoch E with
  E > 0 and E % every == 0; here that is the start of epoch E + 1, so each epoch's
  validation score and best checkpoint are those of trained weights, as there.
- theta^0 is captured at the first ``on_epoch_start`` (after any DDP broadcast, so all
  ranks agree; for pretrained encoders that is the pretrained weights) and kept in
  ``state_dict`` so a resumed run re-initialises towards the same point. This makes the
  checkpoint hold one extra copy of the encoders' weights.
- Only the encoder's parameters move; its buffers (batch-norm statistics) and the optimizer
  state are left as they are, as in the benchmark.
- Features come from the epoch's training loader (as trained: augmentation on) and the
  validation loader, in eval mode without gradients; ``max_batches`` caps each pass.
  Under DDP the training features are gathered from every rank; each rank reads the
  whole validation part. k-means is scikit-learn's, seeded, so every rank gets the same alpha.
- With fewer samples than classes, purity is undefined: that modality is not re-initialised.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from avbalance.errors import UserError
from trainer.balancing.agm import eval_mode
from trainer.balancing.base import Balancer, register
from trainer.distributed import gather_rows


def minmax_scale(x: np.ndarray) -> np.ndarray:
    """Each column mapped linearly onto [-1, 1]; a constant column becomes -1 (as scikit-learn)."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (x - lo) / span * 2.0 - 1.0


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of samples whose label is their cluster's majority label."""
    if len(labels) == 0:
        return float("nan")
    table = np.zeros((int(clusters.max()) + 1, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(table, (clusters, labels), 1)
    return float(table.max(axis=1).sum() / len(labels))


def cluster_purity(features: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0,
                   n_init: int = 10) -> float:
    """k-means (k = ``n_classes``, ``n_init`` starts) on MinMax-scaled ``features``, scored by
    purity; NaN if N < k."""
    from sklearn.cluster import KMeans

    if len(labels) < n_classes:
        return float("nan")
    clusters = KMeans(n_clusters=n_classes, random_state=seed, n_init=n_init).fit_predict(
        minmax_scale(features.astype(np.float64)))
    return purity(clusters, labels)


def reinit_strength(train_purity: float, val_purity: float, lam: float) -> float:
    """alpha = tanh(lambda * |P_train - P_val|); 0 when either purity is undefined."""
    gap = abs(train_purity - val_purity)
    return 0.0 if np.isnan(gap) else float(np.tanh(lam * gap))


def soft_reinit(encoder: nn.Module, initial: Mapping[str, torch.Tensor], alpha: float) -> None:
    """theta <- alpha * theta_0 + (1 - alpha) * theta, in place, for every parameter in ``initial``."""
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name in initial:
                p.mul_(1.0 - alpha).add_(initial[name].to(p.device, p.dtype), alpha=alpha)


def _to_device(inputs: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device) -> dict:
    return {m: {k: v.to(device) for k, v in d.items()} for m, d in inputs.items()}


@torch.no_grad()
def encoder_features(model: nn.Module, loader: Any, max_batches: int | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``out.features[m]`` for every sample of ``loader`` (eval mode) and the labels, as numpy."""
    device = next(model.parameters()).device
    feats: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
    labels: list[torch.Tensor] = []
    batches = loader if max_batches is None else itertools.islice(loader, max_batches)
    with eval_mode(model):
        for batch in batches:
            out = model(_to_device(batch["inputs"], device))
            for m in feats:
                feats[m].append(out.features[m].float())
            labels.append(batch["label"].to(device))
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    z = {m: torch.cat(v) if v else torch.zeros(0, 1, device=device) for m, v in feats.items()}
    return {m: v.cpu().numpy() for m, v in z.items()}, y.cpu().numpy()


@register("relearning")
class Relearning(Balancer):
    """Purity-diagnosed soft re-initialisation of the encoders (see the module docstring).

    ``log()`` gives ``alpha/<m>``, ``purity_train/<m>`` and ``purity_val/<m>`` of the last
    diagnosis and ``reinits`` (how many happened so far).
    """

    def __init__(self, lam: float = 3.0, every: int = 20, times: int = 3, max_batches: int | None = None,
                 seed: int = 0, n_init: int = 10) -> None:
        super().__init__()
        if not lam > 0:
            raise UserError(f"relearning: lam must be > 0, got {lam}")
        if int(every) < 1:
            raise UserError(f"relearning: every must be >= 1 epoch, got {every}")
        if int(times) < 0:
            raise UserError(f"relearning: times must be >= 0, got {times}")
        if max_batches is not None and int(max_batches) < 1:
            raise UserError(f"relearning: max_batches must be >= 1 or None, got {max_batches}")
        if int(n_init) < 1:
            raise UserError(f"relearning: n_init must be >= 1, got {n_init}")
        self.n_init = int(n_init)
        self.lam, self.every, self.times = float(lam), int(every), int(times)
        self.max_batches = None if max_batches is None else int(max_batches)
        self.seed = int(seed)
        self.initial: dict[str, dict[str, torch.Tensor]] = {}   # m -> encoder param name -> CPU tensor
        self.reinits = 0
        self._last: dict[str, dict[str, float]] = {}

    def due(self, epoch: int) -> bool:
        """At the start of epoch E + 1 when the reference re-initialises after epoch E."""
        done = epoch - 1
        return done > 0 and done % self.every == 0 and self.reinits < self.times

    def on_epoch_start(self, model: nn.Module, epoch: int, loader: Any = None, val_loader: Any = None) -> None:
        if not self.initial:
            self.initial = {m: {n: p.detach().cpu().clone() for n, p in model.encoders[m].named_parameters()}
                            for m in model.modalities}
        if not self.due(epoch) or loader is None or val_loader is None:
            return
        n_classes = model.n_classes
        train_z, train_y = encoder_features(model, loader, self.max_batches)
        val_z, val_y = encoder_features(model, val_loader, self.max_batches)
        device = next(model.parameters()).device  # NCCL gathers device tensors only
        gather = lambda a: gather_rows(torch.from_numpy(a).to(device)).cpu().numpy()  # noqa: E731
        train_y = gather(train_y)
        last: dict[str, dict[str, float]] = {"alpha": {}, "purity_train": {}, "purity_val": {}}
        for m in model.modalities:
            z_train = gather(train_z[m])
            p_train = cluster_purity(z_train, train_y, n_classes, self.seed, self.n_init)
            p_val = cluster_purity(val_z[m], val_y, n_classes, self.seed, self.n_init)
            alpha = reinit_strength(p_train, p_val, self.lam)
            soft_reinit(model.encoders[m], self.initial[m], alpha)
            last["alpha"][m], last["purity_train"][m], last["purity_val"][m] = alpha, p_train, p_val
        self.reinits += 1
        self._last = last

    def log(self) -> dict[str, float]:
        out: dict[str, float] = {"reinits": float(self.reinits)}
        for key, values in self._last.items():
            out.update({f"{key}/{m}": float(v) for m, v in values.items() if np.isfinite(v)})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"initial": {m: dict(d) for m, d in self.initial.items()}, "reinits": self.reinits,
                "last": {k: dict(v) for k, v in self._last.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial = {m: {n: torch.as_tensor(t).clone() for n, t in d.items()} for m, d in state.get("initial", {}).items()}
        self.reinits = int(state.get("reinits", 0))
        self._last = {k: {m: float(x) for m, x in v.items()} for k, v in state.get("last", {}).items()}
