"""Neural-collapse metrics (NC1-NC4) for any classifier, streamed over a dataloader.

Definitions follow the official code of "Neural Collapse in Deep Linear Networks: From Balanced to Imbalanced Data"
(Dang et al., ICML 2023; validate_NC.py / validate_NC_unbalanced.py), which the paper's figures are measured with:

- NC1 = (1/K) tr(Sigma_W Sigma_B^+), with Sigma_W = (1/N) sum_k sum_i (h_ki - mu_k)(.)^T over all N samples and
  Sigma_B = (1/K) sum_k (mu_k - mu_G)(.)^T unweighted over classes (also for imbalanced data); and the trace ratio
  tr(Sigma_W) / tr(Sigma_B) of Tirer et al. (2023).
- NC2: W W^T and the class-mean Gram matrix, each Frobenius-normalised, against a frame: the orthogonal frame
  I/sqrt(K) with uncentred means (bias-free head), the simplex ETF with centred means (head with bias), or the
  imbalanced "general orthogonal frame" whose lengths come from `imbalanced_geometry`.
- NC3 in two forms: W against the (scaled) class means, and W H̄ against the frame.
- NC4: the fraction of samples where the classifier's argmax and the nearest class centre disagree.

Partial products W_M...W_m of a stack of M linear layers are measured against the features entering layer m
(`partial_products`, `layer_collapse_metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.state import Callback, TrainingState

FRAMES = ("orthogonal", "etf", "general-orthogonal")


def _as_batch(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    features, labels = torch.as_tensor(features), torch.as_tensor(labels)
    if features.ndim != 2:
        raise ValueError(f"features must be a [N, d] matrix, got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)}, dtype {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"mismatched counts: {features.shape[0]} feature rows but {labels.shape[0]} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    # Accumulated on the CPU in float64: sums of squares over a whole dataset lose digits in float32.
    return features.detach().to("cpu", torch.float64), labels.detach().to("cpu", torch.long)


class ClassStatistics:
    """Per-class sums, counts and one global second moment, in float64: enough for Sigma_W, Sigma_B and the class
    means without holding the features. Sigma_W = (1/N)(sum_i h_i h_i^T - sum_k n_k mu_k mu_k^T)."""

    def __init__(self, num_classes: int):
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.sums: Tensor | None = None  # [K, d]
        self.second_moment: Tensor | None = None  # [d, d]
        self.counts = torch.zeros(self.num_classes, dtype=torch.float64)

    @property
    def dim(self) -> int | None:
        return None if self.sums is None else self.sums.shape[1]

    def update(self, features: Tensor, labels: Tensor) -> None:
        features, labels = _as_batch(features, labels, self.num_classes)
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, features.shape[1], dtype=torch.float64)
            self.second_moment = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        elif features.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed from {self.dim} to {features.shape[1]}")
        self.sums.index_add_(0, labels, features)
        self.second_moment += features.T @ features
        self.counts += torch.bincount(labels, minlength=self.num_classes).to(torch.float64)

    @classmethod
    def from_features(cls, features: Tensor, labels: Tensor, num_classes: int) -> "ClassStatistics":
        stats = cls(num_classes)
        stats.update(features, labels)
        return stats

    def reduce(self, accelerator=None) -> "ClassStatistics":
        """Sums over processes (through `accelerator.reduce`, or torch.distributed when it is initialised), so that
        every process holds the statistics of the whole dataset. Returns a new object; a no-op on one process."""
        self._check()
        tensors = [self.sums, self.second_moment, self.counts]
        if accelerator is not None and accelerator.num_processes > 1:
            device = accelerator.device
            tensors = [accelerator.reduce(t.to(device), reduction="sum").cpu() for t in tensors]
        elif accelerator is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            tensors = [t.clone() for t in tensors]
            for t in tensors:
                torch.distributed.all_reduce(t)
        out = ClassStatistics(self.num_classes)
        out.sums, out.second_moment, out.counts = (t.clone() for t in tensors)
        return out

    def _check(self) -> None:
        if self.sums is None:
            raise ValueError("no features were accumulated: call update() first")

    def _check_populated(self) -> None:
        self._check()
        n, k = int(self.counts.sum()), self.num_classes
        if n < k:
            raise ValueError(f"fewer samples ({n}) than classes ({k}): need at least one sample per class")
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no samples: every one of the {k} classes needs at least one")

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def class_means(self) -> Tensor:
        self._check_populated()
        return self.sums / self.counts[:, None]

    @property
    def global_mean(self) -> Tensor:
        self._check_populated()
        return self.sums.sum(0) / self.counts.sum()

    @property
    def within_covariance(self) -> Tensor:
        means = self.class_means
        sigma_w = (self.second_moment - (means.T * self.counts) @ means) / self.counts.sum()
        return (sigma_w + sigma_w.T) / 2

    @property
    def between_covariance(self) -> Tensor:
        centred = self.class_means - self.global_mean
        return centred.T @ centred / self.num_classes


def nc1(stats: ClassStatistics) -> float:
    """(1/K) tr(Sigma_W Sigma_B^+)."""
    sigma_b_pinv = torch.linalg.pinv(stats.between_covariance, hermitian=True)
    return float(torch.trace(stats.within_covariance @ sigma_b_pinv)) / stats.num_classes


def nc1_trace_ratio(stats: ClassStatistics) -> float:
    """tr(Sigma_W) / tr(Sigma_B)."""
    return float(torch.trace(stats.within_covariance) / torch.trace(stats.between_covariance))


def simplex_etf(K: int) -> Tensor:
    """Gram matrix of the K-class simplex ETF, unit Frobenius norm: (I - 11^T/K) / sqrt(K-1)."""
    return (torch.eye(K, dtype=torch.float64) - 1.0 / K) / math.sqrt(K - 1)


def orthogonal_frame(K: int) -> Tensor:
    """Gram matrix of K orthogonal equal-length vectors, unit Frobenius norm: I / sqrt(K)."""
    return torch.eye(K, dtype=torch.float64) / math.sqrt(K)


# --- imbalanced deep-linear geometry (closed form) -----------------------------------------------------------------


@dataclass(frozen=True)
class ImbalancedGeometry:
    """The bias-free MSE optimum of the M-layer deep linear UFM
    ||W_M...W_1 H - Y||^2/(2N) + (lambda_W/2) sum_m ||W_m||^2 + (lambda_H/2) ||H||^2 with n_k samples in class k.

    Every W_m has singular values s_k (one per class, the same in every layer); W = W_M...W_1 has rows of squared
    length s_k^{2M} along mutually orthogonal directions, and the class means sit on the same directions with
    ||h_k||^2 = s_k^{2M} / (s_k^{2M} + N lambda_H)^2. Classes with s_k = 0 have collapsed to zero (minority collapse).
    """

    counts: tuple[int, ...]
    depth: int
    lambda_w: float
    lambda_h: float
    x: Tensor  # [K] the root x_k of n_k M x^{M-1} / (x^M + 1)^2 = b (0 where the zero solution wins)
    s: Tensor  # [K] singular value of each layer along class k, s_k = (N lambda_H x_k^M)^{1/(2M)}

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def weight_gram(self, layers: int | None = None) -> Tensor:
        """diag(s_k^{2j}): Gram of the product of the top j layers (default all M)."""
        return torch.diag(self.s ** (2 * (self.depth if layers is None else layers)))

    @property
    def feature_scale(self) -> Tensor:
        """a_k = ||h_k|| on the last-layer input: s^M / (s^{2M} + N lambda_H)."""
        s_m = self.s ** self.depth
        return s_m / (s_m**2 + self.num_samples * self.lambda_h)

    def mean_gram(self, layers: int | None = None) -> Tensor:
        """Gram of the class means entering the top j layers (default all M: the UFM features H):
        diag(s_k^{2(M-j)} a_k^2)."""
        j = self.depth if layers is None else layers
        return torch.diag(self.s ** (2 * (self.depth - j)) * self.feature_scale**2)

    @property
    def logits_gram(self) -> Tensor:
        """W H̄ = diag(s_k^{2M} / (s_k^{2M} + N lambda_H)), whatever the split point."""
        return torch.diag(self.s**self.depth * self.feature_scale)

    def duality_scale(self, layers: int | None = None) -> Tensor:
        """c_k with (top j layers) = diag(c_k) H̄_j^T: s^j / (s^{M-j} a_k) (= s^{2M} + N lambda_H for j = M)."""
        j = self.depth if layers is None else layers
        denom = self.s ** (self.depth - j) * self.feature_scale
        return torch.where(denom > 0, self.s**j / denom.clamp_min(1e-300), torch.zeros_like(denom))


def imbalanced_geometry(counts: Sequence[int], depth: int, lambda_w: float, lambda_h: float) -> ImbalancedGeometry:
    """The closed form of Dang et al. (2023) for bias-free MSE with per-class counts n_k and M = `depth` layers.

    Per class, with sigma = s^M the singular value of the product and the optimal feature length plugged in, the
    objective is n_k lambda_H / (2 (s^{2M} + N lambda_H)) + M lambda_W s^2 / 2; writing s^{2M} = N lambda_H x^M its
    stationary points solve n_k M x^{M-1} / (x^M + 1)^2 = b, b = M N (N lambda_W^M lambda_H)^{1/M}. The official code
    takes the largest real root; for M >= 2, x = 0 is also a local minimum, so here the root is kept only where it
    has the lower objective (it always does when it exists for M = 1).
    """
    counts = [int(n) for n in counts]
    if len(counts) < 2 or min(counts) < 1:
        raise ValueError(f"counts must list at least 2 classes with at least one sample each, got {counts}")
    if int(depth) < 1:
        raise ValueError(f"depth (number of linear layers M) must be >= 1, got {depth}")
    if not (lambda_w > 0 and lambda_h > 0):
        raise ValueError(f"lambda_w and lambda_h must be > 0, got {lambda_w}, {lambda_h}")
    M, N = int(depth), sum(counts)
    b = M * N * (N * lambda_w**M * lambda_h) ** (1.0 / M)

    def objective(n_k: int, x: float) -> float:
        return n_k / (2 * N * (x**M + 1)) + M * lambda_w * (N * lambda_h) ** (1.0 / M) * x / 2

    xs = []
    for n_k in counts:
        # n_k M x^{M-1} - b (x^M + 1)^2 = 0, highest degree first.
        poly = np.zeros(2 * M + 1)
        poly[0] -= b
        poly[M] -= 2 * b
        poly[2 * M] -= b
        poly[M + 1] += n_k * M
        roots = np.roots(poly)
        real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
        real = real[real > 0]
        x = float(real.max()) if real.size else 0.0
        xs.append(x if x > 0 and objective(n_k, x) < objective(n_k, 0.0) else 0.0)
    x = torch.tensor(xs, dtype=torch.float64)
    s = (N * lambda_h * x**M) ** (1.0 / (2 * M))
    return ImbalancedGeometry(tuple(counts), M, float(lambda_w), float(lambda_h), x, s)


# --- NC4 -----------------------------------------------------------------------------------------------------------


class NearestClassCentre:
    """Streams NC4: how often argmax(W h + b) agrees with the nearest class centre argmin_k ||h - mu_k|| (the
    centres come from a finished `ClassStatistics`, so this is a second pass over the data)."""

    def __init__(self, class_means: Tensor, weight: Tensor, bias: Tensor | None = None):
        self.class_means = torch.as_tensor(class_means).detach().to("cpu", torch.float64)
        self.weight = torch.as_tensor(weight).detach().to("cpu", torch.float64)
        self.bias = None if bias is None else torch.as_tensor(bias).detach().to("cpu", torch.float64)
        if self.weight.shape != self.class_means.shape:
            raise ValueError(f"weight has shape {tuple(self.weight.shape)} but the class means have "
                             f"{tuple(self.class_means.shape)}: need one weight row per class, same feature dim")
        self.agree = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        features = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if features.ndim != 2 or features.shape[1] != self.class_means.shape[1]:
            raise ValueError(f"features must be [N, {self.class_means.shape[1]}], got {tuple(features.shape)}")
        logits = features @ self.weight.T + (0 if self.bias is None else self.bias)
        nearest = torch.cdist(features, self.class_means).argmin(1)
        self.agree += (logits.argmax(1) == nearest).sum()
        self.total += features.shape[0]

    def reduce(self, accelerator=None) -> "NearestClassCentre":
        out = NearestClassCentre(self.class_means, self.weight, self.bias)
        tensors = [self.agree.clone(), self.total.clone()]
        if accelerator is not None and accelerator.num_processes > 1:
            tensors = [accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu() for t in tensors]
        elif accelerator is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in tensors:
                torch.distributed.all_reduce(t)
        out.agree, out.total = tensors
        return out

    @property
    def agreement(self) -> float:
        if self.total == 0:
            raise ValueError("no features were accumulated: call update() first")
        return float(self.agree / self.total)

    @property
    def mismatch(self) -> float:
        """NC4 as reported: 1 - agreement (0 at full collapse)."""
        return 1.0 - self.agreement


# --- NC2 / NC3 against a frame -------------------------------------------------------------------------------------


def _normalised(a: Tensor) -> Tensor:
    norm = torch.linalg.matrix_norm(a)
    if norm == 0:
        raise ValueError("cannot normalise an all-zero matrix (weights or class means are zero)")
    return a / norm


def _distance(a: Tensor, target: Tensor) -> float:
    return float(torch.linalg.matrix_norm(_normalised(a) - _normalised(target)))


def collapse_metrics(stats: ClassStatistics, weight: Tensor, bias: Tensor | None = None, *, frame: str | None = None,
                     geometry: ImbalancedGeometry | None = None, layers: int | None = None,
                     nc4: NearestClassCentre | None = None) -> dict[str, float]:
    """NC1-NC3 (and NC4 if a finished `NearestClassCentre` is given) of features `stats` under the linear map
    `weight` [K, d] (a head, or a partial product W_M...W_m when the features enter layer m).

    frame: "orthogonal" (bias-free head; uncentred class means against I/sqrt(K)), "etf" (head with bias; class
    means centred by the global mean, against the simplex ETF) or "general-orthogonal" (bias-free imbalanced
    optimum: targets from `geometry`, with `layers` = how many top layers `weight` is the product of, default all).
    Default: "general-orthogonal" if a geometry is given, else "etf" with a bias and "orthogonal" without.

    Keys: nc1, nc1_trace_ratio, nc2_w (W W^T vs frame), nc2_h (class-mean Gram vs frame), nc3 (W vs scaled H̄^T),
    nc3_wh (W H̄ vs frame), and nc4 (1 - nearest-centre agreement) when given.
    """
    if frame is None:
        frame = "general-orthogonal" if geometry is not None else ("etf" if bias is not None else "orthogonal")
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if frame == "general-orthogonal" and geometry is None:
        raise ValueError("frame='general-orthogonal' needs geometry=imbalanced_geometry(counts, depth, ...)")
    means = stats.class_means  # checks the sample / class counts
    K, d = means.shape
    weight = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    if weight.shape != (K, d):
        raise ValueError(f"weight must be [num_classes={K}, feature_dim={d}], got {tuple(weight.shape)}")
    if frame == "etf" and K > d + 1:
        raise ValueError(f"the simplex ETF of K={K} classes needs feature dimension >= K-1, got d={d}")
    if frame != "etf" and K > d:
        raise ValueError(f"the {frame} frame of K={K} classes needs feature dimension d >= K, got d={d}")
    if frame == "general-orthogonal" and len(geometry.counts) != K:
        raise ValueError(f"geometry has {len(geometry.counts)} classes, the statistics have {K}")

    H = (means - stats.global_mean).T if frame == "etf" else means.T  # [d, K]
    if frame == "general-orthogonal":
        target_w, target_h = geometry.weight_gram(layers), geometry.mean_gram(layers)
        target_wh, duality = geometry.logits_gram, geometry.duality_scale(layers)[:, None]
    else:
        target = simplex_etf(K) if frame == "etf" else orthogonal_frame(K)
        target_w = target_h = target_wh = target
        duality = torch.ones(K, 1, dtype=torch.float64)
    out = {
        "nc1": nc1(stats),
        "nc1_trace_ratio": nc1_trace_ratio(stats),
        "nc2_w": _distance(weight @ weight.T, target_w),
        "nc2_h": _distance(H.T @ H, target_h),
        "nc3": _distance(weight, duality * H.T),
        "nc3_wh": _distance(weight @ H, target_wh),
    }
    if nc4 is not None:
        out["nc4"] = nc4.mismatch
    return out


def partial_products(weights: Sequence[Tensor]) -> list[Tensor]:
    """[W_M...W_1, W_M...W_2, ..., W_M] for `weights` = [W_1, ..., W_M] in forward order (W_1 applied first)."""
    if not weights:
        raise ValueError("need at least one linear layer")
    out = [torch.as_tensor(weights[-1]).detach().to("cpu", torch.float64)]
    for w in reversed(weights[:-1]):
        w = torch.as_tensor(w).detach().to("cpu", torch.float64)
        if out[0].shape[1] != w.shape[0]:
            raise ValueError(f"layer shapes do not chain: {tuple(w.shape)} then {tuple(out[0].shape)}")
        out.insert(0, out[0] @ w)
    return out


def layer_collapse_metrics(stats_per_layer: Sequence[ClassStatistics], weights: Sequence[Tensor],
                           bias: Tensor | None = None, **kwargs) -> list[dict[str, float]]:
    """`collapse_metrics` of W_M...W_m against the features entering layer m, for m = 1..M.

    stats_per_layer[m-1] holds the features entering weights[m-1]; `bias` is the last layer's (it only picks the
    frame); with a `geometry`, the product of the top M-m+1 layers is measured against its own targets."""
    if len(stats_per_layer) != len(weights):
        raise ValueError(f"{len(stats_per_layer)} feature statistics for {len(weights)} layers: need one per layer")
    products = partial_products(weights)
    return [collapse_metrics(stats, product, bias, layers=len(weights) - m, **kwargs)
            for m, (stats, product) in enumerate(zip(stats_per_layer, products))]


def accumulate(batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, accelerator=None) -> ClassStatistics:
    """One pass over (features, labels) batches, reduced across processes."""
    stats = ClassStatistics(num_classes)
    for features, labels in batches:
        stats.update(features, labels)
    return stats.reduce(accelerator)


# --- the engine callback -------------------------------------------------------------------------------------------


def classification_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that maps a classifier's penultimate features to its `config.num_labels` logits: the
    model's output embeddings when they are such a layer, else the last `nn.Linear` with num_labels outputs."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"{type(model).__name__} is not a classifier: neural-collapse metrics need a model whose "
                         f"config has num_labels >= 2 (got {num_labels})")
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if isinstance(head, torch.nn.Linear) and head.out_features == num_labels:
        return head
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no nn.Linear with out_features == num_labels={num_labels}: "
                         "cannot find the classification head whose input is the penultimate feature")
    return heads[-1]


def _model_inputs(batch) -> tuple[dict, Tensor]:
    if not isinstance(batch, dict) or "labels" not in batch:
        got = f"keys {list(batch)}" if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"neural-collapse metrics need eval batches that are dicts with a 'labels' entry (class ids), "
                         f"got {got}")
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


@torch.no_grad()
def measure_classifier(model, dataloader, accelerator=None) -> dict[str, float]:
    """NC1-NC4 of a classifier's penultimate features over a dataloader of {inputs..., "labels"} dicts, against the
    simplex ETF when its head has a bias and the orthogonal frame when it has none.

    Two passes (class means first, then the nearest-centre agreement), one batch held at a time. Under a prepared
    dataloader, each batch is gathered across processes (`gather_for_metrics`, which drops the padding of the last
    batch), so every process gets the numbers of the whole eval set."""
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    head = classification_head(unwrapped)
    K = unwrapped.config.num_labels
    captured: list[Tensor] = []

    def hook(module, inputs):
        captured.append(inputs[0])

    def batches():
        for batch in dataloader:
            inputs, labels = _model_inputs(batch)
            captured.clear()
            model(**inputs)
            if len(captured) != 1 or captured[0].ndim != 2:
                raise ValueError(f"the head {type(head).__name__}(out_features={K}) must run once per forward on "
                                 f"[batch, features] inputs; got {[tuple(c.shape) for c in captured]}")
            features = captured[0].float()
            if accelerator is not None:
                features, labels = accelerator.gather_for_metrics((features, labels))
            yield features, labels

    was_training = model.training
    model.eval()
    handle = head.register_forward_pre_hook(hook)
    try:
        stats = ClassStatistics(K)
        for features, labels in batches():
            stats.update(features, labels)
        agreement = NearestClassCentre(stats.class_means, head.weight, head.bias)
        for features, _ in batches():
            agreement.update(features)
    finally:
        handle.remove()
        model.train(was_training)
    return collapse_metrics(stats, head.weight, head.bias, nc4=agreement)


def plot_collapse_curves(history: list[dict], path, prefix: str = "eval_") -> None:
    """NC1 (log scale), NC2, NC3 and NC4 per epoch from the run's records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..engine.run_folder import writing

    rows = [r for r in history if f"{prefix}nc1" in r]
    epochs = [r["epoch"] for r in rows]
    panels = [("NC1: within-class variability", ["nc1", "nc1_trace_ratio"], "log"),
              ("NC2: distance to the frame", ["nc2_w", "nc2_h"], "linear"),
              ("NC3: self-duality", ["nc3", "nc3_wh"], "linear"),
              ("NC4: argmax != nearest centre", ["nc4"], "linear")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (title, keys, scale) in zip(axes, panels):
        for key in keys:
            ax.plot(epochs, [r[f"{prefix}{key}"] for r in rows], marker="o", label=key)
        ax.set(xlabel="epoch", title=title, yscale=scale)
        ax.legend()
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=100)
    plt.close(fig)


class NeuralCollapseCallback(Callback):
    """Engine callback (`TrainingArguments(neural_collapse=True)`, `hfpapers train ... --neural-collapse`): after
    each epoch's evaluation, NC1-NC4 of the trained model's penultimate features on the eval set join the epoch's
    eval metrics (logged to metrics.jsonl as eval_nc1, ...), and the curves so far are drawn to neural_collapse.png.
    The trained weights are measured (not an EMA). Refuses, before the first step, a model without a
    classification head and eval batches without labels."""

    def on_train_begin(self, state: TrainingState, model, accelerator) -> None:
        classification_head(accelerator.unwrap_model(model))
        if state.eval_dataloader is None:
            raise ValueError("NeuralCollapseCallback needs the loop's eval dataloader (state.eval_dataloader)")
        dataset = state.eval_dataloader.dataset
        if hasattr(dataset, "__getitem__") and len(dataset):  # read one item: iterating would touch RNG states
            _model_inputs(dataset[0])

    def on_evaluate(self, state: TrainingState, model, metrics: dict[str, float], accelerator) -> None:
        metrics.update(measure_classifier(model, state.eval_dataloader, accelerator))

    def on_epoch_end(self, state: TrainingState, model, accelerator) -> None:
        if accelerator.is_main_process:
            from ..engine.run_folder import NEURAL_COLLAPSE_FILE

            plot_collapse_curves(state.history, Path(accelerator.project_dir) / NEURAL_COLLAPSE_FILE)
