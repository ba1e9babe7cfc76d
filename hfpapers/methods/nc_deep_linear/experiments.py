"""The paper's three measurements: NC metrics of a given classifier (per layer, and for the partial products of its
trailing linear layers), the UFM arms against the predicted geometry, and an MLP with a deep linear head trained on
the embedded digits with NC measured after every epoch. Every NC number comes from the core toolkit
(`hfpapers.analysis`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...analysis import (ClassStatistics, collapse_metrics, imbalanced_geometry, layer_collapse_metrics, nc1,
                         nc1_trace_ratio)
from .config import NcDeepLinearConfig
from .deep_linear import DeepLinearClassifier
from .ufm import UFMSolution, solve_ufm

__all__ = ["ufm_layer_metrics", "predicted_norms", "measured_norms", "minority_threshold", "ufm_arms",
           "classifier_collapse", "digits_collapse"]


def _frame(loss: str, bias: bool, balanced: bool) -> str:
    """What the paper predicts the head and class means collapse to: MSE bias-free -> an orthogonal frame (the
    general one, lengths from the closed form, when imbalanced); with a bias, or CE (balanced) -> a simplex ETF."""
    if loss == "mse" and not bias:
        return "orthogonal" if balanced else "general-orthogonal"
    return "etf"


def ufm_layer_metrics(model, labels: torch.Tensor, *, frame: str, counts: Sequence[int] | None = None,
                      weight_decay: float | None = None, feature_decay: float | None = None) -> list[dict]:
    """NC metrics of every layer m: the features entering W_m against the partial product W_M..W_m (against its
    own closed-form targets for the general orthogonal frame)."""
    num_classes = model.linear[-1].out_features
    stats = [ClassStatistics.from_features(h.detach(), labels, num_classes) for h in model.linear_inputs()]
    geometry = (imbalanced_geometry(counts, len(model.linear), weight_decay, feature_decay)
                if frame == "general-orthogonal" else None)
    bias = model.linear[-1].bias
    return layer_collapse_metrics(stats, [layer.weight.detach() for layer in model.linear],
                                  None if bias is None else bias.detach(), frame=frame, geometry=geometry)


def predicted_norms(counts: Sequence[int], depth: int, weight_decay: float, feature_decay: float) -> dict:
    """The closed form's row norms of W = W_M..W_1 (s_k^M) and class-mean norms of H (s_k^M / (s_k^2M + N l_H))."""
    geometry = imbalanced_geometry(counts, depth, weight_decay, feature_decay)
    return {"weight": (geometry.s ** depth).tolist(), "feature": geometry.feature_scale.tolist()}


def measured_norms(solution: UFMSolution) -> dict:
    model, labels = solution.model, solution.labels
    with torch.no_grad():
        rows = model.partial_products()[0].norm(dim=1)
        means = torch.stack([model.H[labels == k].mean(0) for k in range(len(rows))]).norm(dim=1)
    return {"weight": rows.tolist(), "feature": means.tolist()}


def minority_threshold(counts: Sequence[int], weight_decay: float, feature_decay: float) -> float:
    """M = 1: class k collapses (w_k = 0, h_k = 0) iff n_k <= N^2 lambda_W lambda_H."""
    return sum(counts) ** 2 * weight_decay * feature_decay


def _relative_error(measured: Sequence[float], predicted: Sequence[float]) -> float:
    scale = max(predicted)
    return max(abs(m - p) for m, p in zip(measured, predicted)) / scale


def ufm_arms(config: NcDeepLinearConfig) -> list[dict]:
    """Every UFM arm: balanced (MSE bias-free, MSE with bias, CE) and imbalanced MSE at every depth, and the
    minority-collapse arm (M = 1, lambda = minority_decay). One dict per arm with its curves and final numbers."""
    arms = []
    for depth in config.depths:
        settings = [("balanced", config.balanced_counts, loss, bias, config.weight_decay)
                    for loss in config.losses for bias in ((False, True) if loss == "mse" else (False,))]
        if "mse" in config.losses:
            settings.append(("imbalanced", config.imbalanced_counts, "mse", False, config.weight_decay))
            if depth == 1:
                settings.append(("minority collapse", config.imbalanced_counts, "mse", False, config.minority_decay))
        for name, counts, loss, bias, decay in settings:
            feature_decay = config.feature_decay if name != "minority collapse" else decay
            frame = _frame(loss, bias, len(set(counts)) == 1)
            geometry = dict(counts=counts, weight_decay=decay, feature_decay=feature_decay)

            def measure(model, labels, frame=frame, geometry=geometry):
                return ufm_layer_metrics(model, labels, frame=frame, **geometry)[0]

            solution = solve_ufm(counts, hidden=config.hidden, depth=depth, loss=loss, bias=bias,
                                 weight_decay=decay, feature_decay=feature_decay,
                                 learning_rate=config.learning_rate, momentum=config.momentum,
                                 init_std=config.init_std, num_iterations=config.num_iterations, seed=config.seed,
                                 record_every=config.record_every, measure=measure)
            arm = {"arm": name, "depth": depth, "loss": loss, "bias": bias, "counts": list(counts),
                   "weight_decay": decay, "feature_decay": feature_decay, "frame": frame,
                   "objective": solution.objective, "curve": solution.history,
                   "layers": ufm_layer_metrics(solution.model, solution.labels, frame=frame, **geometry)}
            if loss == "mse" and not bias:
                arm["measured_norms"] = measured_norms(solution)
                arm["predicted_norms"] = predicted_norms(counts, depth, decay, feature_decay)
                arm["norm_error"] = _relative_error(arm["measured_norms"]["weight"] + arm["measured_norms"]["feature"],
                                                    arm["predicted_norms"]["weight"] + arm["predicted_norms"]["feature"])
            if name == "minority collapse":
                threshold = minority_threshold(counts, decay, feature_decay)
                largest = max(arm["measured_norms"]["weight"])
                arm["threshold"] = threshold
                arm["predicted_collapsed"] = [n <= threshold for n in counts]
                arm["measured_collapsed"] = [w < 0.05 * largest for w in arm["measured_norms"]["weight"]]
            arms.append(arm)
    return arms


def _head(model, num_labels: int) -> torch.nn.Linear:
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if len(heads) != 1:
        raise ValueError(f"the NC metrics need the classifier's head: found {len(heads)} Linear layers with "
                         f"{num_labels} outputs instead of one")
    return heads[0]


def _encode(processor, data, num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) == 0:
        raise ValueError("the dataset split the NC metrics read is empty")
    data = data.select(range(min(num_examples, len(data))))
    for column in ("label", "image"):
        if column not in data.column_names:
            raise ValueError(f"the NC metrics need an 'image' and a 'label' column; columns: {data.column_names}")
    pixels = processor(list(data["image"]), return_tensors="pt")["pixel_values"].float()
    return pixels, torch.as_tensor(list(data["label"]))


@torch.no_grad()
def classifier_collapse(model, processor, data, config: NcDeepLinearConfig) -> dict:
    """NC1 / trace ratio of every hidden state (mean over tokens where there are tokens), and the NC metrics of
    the features entering the head against the head (simplex ETF with a bias, orthogonal frame without).
    Statistics accumulate batch by batch; features are never held at once."""
    model.eval()
    num_labels = model.config.num_labels
    head = _head(model, num_labels)
    pixels, labels = _encode(processor, data, config.num_examples)
    if len(labels) < num_labels or len(labels.unique()) < num_labels:
        missing = sorted(set(range(num_labels)) - set(labels.tolist()))
        raise ValueError(f"the NC metrics need examples of every class; classes {missing} have none in the first "
                         f"{len(labels)} examples: raise num_examples")
    tapped = {}
    handle = head.register_forward_pre_hook(lambda module, args: tapped.__setitem__("h", args[0].flatten(1)))
    layers, penultimate = None, ClassStatistics(num_labels)
    try:
        for start in range(0, len(labels), config.batch_size):
            y = labels[start:start + config.batch_size]
            out = model(pixel_values=pixels[start:start + config.batch_size], output_hidden_states=True)
            hidden = [h if h.ndim == 2 else h.flatten(1, -2).mean(1) for h in (out.hidden_states or ())]
            if layers is None:
                layers = [ClassStatistics(num_labels) for _ in hidden]
            for stats, h in zip(layers, hidden):
                stats.update(h.double(), y)
            penultimate.update(tapped["h"].double(), y)
    finally:
        handle.remove()
    frame = "etf" if head.bias is not None else "orthogonal"
    return {
        "per_layer": [{"layer": i, "nc1": nc1(s), "nc1_trace_ratio": nc1_trace_ratio(s)} for i, s in
                      enumerate(layers or [])],
        "head": collapse_metrics(penultimate, head.weight.double(),
                                 None if head.bias is None else head.bias.double(), frame=frame),
        "frame": frame, "num_examples": len(labels),
    }


def _digits_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    x = torch.as_tensor(np.stack([np.asarray(img, dtype=np.float32).reshape(-1) / 255 for img in data["image"]]))
    return x, torch.as_tensor(list(data["label"]))


def digits_collapse(config: NcDeepLinearConfig) -> dict:
    """Train `DeepLinearClassifier` on the embedded digits (MSE loss, Adam, mini-batches of 128) and measure, after
    every epoch on the training set, the NC metrics of each linear layer's input against its partial product."""
    from ... import data as hf_data

    torch.manual_seed(config.seed)
    digits = hf_data.load("digits")
    x, y = _digits_tensors(digits["train"])
    x_test, y_test = _digits_tensors(digits["test"])
    num_classes = int(y.max()) + 1
    model = DeepLinearClassifier(x.shape[1], num_classes, hidden=config.digits_width,
                                 depth_relu=config.digits_depth_relu, depth_linear=config.digits_depth_linear,
                                 bias=True).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.digits_learning_rate,
                                 weight_decay=config.digits_weight_decay)
    x, x_test = x.double(), x_test.double()
    targets = torch.nn.functional.one_hot(y, num_classes).double()
    generator = torch.Generator().manual_seed(config.seed)
    curve = []
    for epoch in range(1, config.digits_epochs + 1):
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(128):
            optimizer.zero_grad(set_to_none=True)
            loss = (model(x[batch]) - targets[batch]).square().sum() / (2 * len(batch))
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            layers = layer_collapse_metrics(
                [ClassStatistics.from_features(h, y, num_classes) for h in model.linear_inputs(x)],
                [layer.weight for layer in model.linear], model.linear[-1].bias, frame="etf")
            accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
        curve.append({"epoch": epoch, "test_accuracy": accuracy, "layers": layers})
    return {"curve": curve, "num_train": len(y), "depth_linear": config.digits_depth_linear}

