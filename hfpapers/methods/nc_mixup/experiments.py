"""The measurements: last-layer features of mixed pairs of a given classifier (Fig. 1), and the paper's fixed
simplex-ETF classifier trained with mixup on the embedded digits, against the UFM optimum (§3)."""

from __future__ import annotations

import math

import torch

from ...analysis.neural_collapse import classification_head
from ...augment import MixupCutmix, mix_images
from .config import NcMixupConfig
from .geometry import fixed_etf_head, optimal_mixup_logits, plane_projection, readout, scale_from_margin

__all__ = ["draw_pairs", "crossing_lambda", "mixed_pairs", "pair_report", "classifier_mixup",
           "FixedETFNetwork", "train_fixed_etf", "fixed_etf_mixup"]


def draw_pairs(labels: torch.Tensor, classes: tuple[int, ...], num_pairs: int, same: bool,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) example indices of `num_pairs` pairs drawn among `classes`: both of one class (`same`), or
    of two different classes; the classes of each pair, then its examples, uniformly."""
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    if any(len(m) < 2 for m in members):
        counts = {c: len(m) for c, m in zip(classes, members)}
        raise ValueError(f"mixed pairs need at least two examples of each class; counts in the data read: {counts}")
    k = len(classes)
    first_class = torch.randint(k, (num_pairs,), generator=generator)
    second_class = first_class if same else (first_class + torch.randint(1, k, (num_pairs,), generator=generator)) % k

    def pick(which):
        sizes = torch.tensor([len(members[c]) for c in which.tolist()])
        offsets = (torch.rand(num_pairs, generator=generator, dtype=torch.float64) * sizes).long()
        return torch.stack([members[c][o] for c, o in zip(which.tolist(), offsets.tolist())])

    return pick(first_class), pick(second_class)


def crossing_lambda(lam: torch.Tensor, gap: torch.Tensor) -> float:
    """Where the least-squares line through (lam, gap) crosses zero: the measured decision boundary."""
    design = torch.stack([torch.ones_like(lam), lam], 1).double()
    intercept, slope = torch.linalg.lstsq(design, gap.double()[:, None]).solution.flatten().tolist()
    return -intercept / slope if slope else float("nan")


def _encode(processor, data, num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) == 0:
        raise ValueError("the dataset split the analysis reads is empty")
    for column in ("image", "label"):
        if column not in data.column_names:
            raise ValueError(f"the analysis needs 'image' and 'label' columns; columns: {data.column_names}")
    data = data.select(range(min(num_examples, len(data))))
    pixels = processor(list(data["image"]), return_tensors="pt")["pixel_values"].float()
    return pixels, torch.as_tensor(list(data["label"]))


@torch.no_grad()
def mixed_pairs(forward, pixels: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...], num_classes: int,
                config: NcMixupConfig, generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Features and logits of `config.num_pairs` mixed pairs of each kind ("same", "different") among `classes`,
    lambda ~ Beta(alpha, alpha) per pair (the weight of the first example); `forward`: images -> (features, logits)."""
    mixer = MixupCutmix(num_classes, mixup_alpha=config.mixup_alpha, per_example=True)
    kinds = {}
    for kind in ("same", "different"):
        first, second = draw_pairs(labels, classes, config.num_pairs, kind == "same", generator)
        n = len(first)
        # the pair's two images in one batch, each the other's partner; the first n rows are the mixes read
        both = torch.cat([first, second])
        swap = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        mixed = mixer(pixels[both], labels[both], generator, partner=swap)
        outputs = [forward(mixed.pixel_values[start:min(start + config.batch_size, n)])
                   for start in range(0, n, config.batch_size)]
        kinds[kind] = {"features": torch.cat([h for h, _ in outputs]).double(),
                       "logits": torch.cat([z for _, z in outputs]).double(),
                       "lam": mixed.lam[:n].double(), "first": labels[first], "second": labels[second]}
    return kinds


def pair_report(kinds: dict, weight: torch.Tensor, classes: tuple[int, ...]) -> dict:
    """Per lambda bin: the cosine of same-class features with their class weight and the logit gap z_c - z_c' of
    different-class mixes (lambda: the weight of c); the projection of every feature onto the plane of the three
    class weights (Fig. 1)."""
    weight = weight.double()
    projection, mu_g = plane_projection(weight[list(classes)])
    same, different = kinds["same"], kinds["different"]
    centred, seen = readout(weight)
    cosine = torch.nn.functional.cosine_similarity(same["features"] @ seen, centred[same["first"]], dim=1)
    rows = torch.arange(len(different["first"]))
    gap = different["logits"][rows, different["first"]] - different["logits"][rows, different["second"]]
    edges = torch.linspace(0, 1, 6, dtype=torch.float64)
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        in_same = (same["lam"] >= low) & (same["lam"] <= high)
        in_diff = (different["lam"] >= low) & (different["lam"] <= high)
        bins.append({"lambda": f"{low:.1f}-{high:.1f}", "pairs": [int(in_same.sum()), int(in_diff.sum())],
                     "same_cosine": float(cosine[in_same].mean()) if in_same.any() else None,
                     "same_norm": float((same["features"][in_same] @ seen).norm(dim=1).mean()) if in_same.any()
                     else None,
                     "different_gap": float(gap[in_diff].mean()) if in_diff.any() else None})
    return {
        "classes": list(classes), "bins": bins,
        "same_cosine_mean": float(cosine.mean()),
        "same_cosine_lambda_correlation": float(torch.corrcoef(torch.stack([cosine, same["lam"]]))[0, 1]),
        "different_crossing_lambda": crossing_lambda(different["lam"], gap),
        "projection": {kind: {"points": ((v["features"] - mu_g) @ projection.T).tolist(), "lam": v["lam"].tolist(),
                              "first": v["first"].tolist(), "second": v["second"].tolist()}
                       for kind, v in kinds.items()},
        "vertices": ((weight[list(classes)] - mu_g) @ projection.T).tolist(),
    }


def _three_classes(config: NcMixupConfig, num_classes: int, generator: torch.Generator) -> tuple[int, ...]:
    classes = config.classes or tuple(torch.randperm(num_classes, generator=generator)[:3].sort().values.tolist())
    if max(classes) >= num_classes:
        raise ValueError(f"classes {classes} name classes the model does not have (it has {num_classes})")
    return classes


@torch.no_grad()
def classifier_mixup(model, processor, data, config: NcMixupConfig) -> dict:
    """`pair_report` of a given classifier: features at its head's input, read as the paper does (training data,
    train mode)."""
    num_labels = model.config.num_labels
    head = classification_head(model)
    generator = torch.Generator().manual_seed(config.seed)
    classes = _three_classes(config, num_labels, generator)
    pixels, labels = _encode(processor, data, config.num_examples)
    tapped = {}

    def forward(images):
        logits = model(pixel_values=images).logits
        return tapped.pop("h"), logits

    handle = head.register_forward_pre_hook(lambda module, args: tapped.__setitem__("h", args[0].flatten(1)))
    model.train(config.train_mode)
    try:
        kinds = mixed_pairs(forward, pixels, labels, classes, num_labels, config, generator)
    finally:
        handle.remove()
        model.eval()
    report = pair_report(kinds, head.weight.detach(), classes)
    return {**report, "class_names": [model.config.id2label[c] for c in classes], "num_examples": len(labels),
            "train_mode": config.train_mode}


def _digits(split) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    images = np.stack([np.asarray(img, dtype=np.float32) for img in split["image"]])
    return torch.as_tensor(images)[:, None], torch.as_tensor(list(split["label"]))


class FixedETFNetwork(torch.nn.Module):
    """An MLP feature extractor (ReLU hidden layers, linear output of width d) and a frozen simplex-ETF head."""

    def __init__(self, in_features: int, config: NcMixupConfig, head: torch.Tensor):
        super().__init__()
        widths = [in_features] + [config.hidden_size] * config.num_hidden_layers
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(torch.nn.Flatten(), *layers, torch.nn.Linear(widths[-1],
                                                                                         config.feature_dim))
        self.register_buffer("head", head.float())  # fixed: never trained

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return h, h @ self.head.T


def train_fixed_etf(config: NcMixupConfig) -> tuple[FixedETFNetwork, torch.Tensor, torch.Tensor, dict]:
    """Train the fixed-ETF network with mixup (the collator, one lambda ~ Beta(alpha, alpha) per batch) on the
    embedded digits; returns the network, the (standardised) training images and labels, and the accuracies."""
    from ... import data as hf_data

    digits = hf_data.load("digits")
    x, y = _digits(digits["train"])
    x_test, y_test = _digits(digits["test"])
    mean, std = x.mean(), x.std()
    x, x_test = (x - mean) / std, (x_test - mean) / std
    num_classes = len(digits["train"].features["label"].names)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    network = FixedETFNetwork(x[0].numel(), config, fixed_etf_head(num_classes, config.feature_dim, generator))
    params = list(network.features.parameters())
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x) / config.train_batch_size)
    milestones = [int(m * config.num_epochs) * steps_per_epoch for m in config.lr_milestones]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    mixer = MixupCutmix(num_classes, mixup_alpha=config.mixup_alpha)
    network.train()
    for _ in range(config.num_epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.train_batch_size):
            index = order[start:start + config.train_batch_size]
            batch = mixer(x[index], y[index], generator)
            loss = batch.loss(network(batch.pixel_values)[1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        accuracy = {"train": float((network(x)[1].argmax(1) == y).float().mean()),
                    "test": float((network(x_test)[1].argmax(1) == y_test).float().mean())}
    return network, x, y, accuracy


def fixed_etf_mixup(config: NcMixupConfig) -> dict:
    """The paper's fixed-ETF experiment, measured against the UFM optimum on a lambda grid: same-class mixes
    (cosine with w_c, norm relative to its mean over lambda; predicted 1 and 1) and different-class mixes (logit
    gap z_c - z_c', predicted by the fixed point z = c (y - softmax(z)) with c fitted to the same-class margin; the
    share of the feature inside span{w_c, w_c'}, predicted 1)."""
    network, x, y, accuracy = train_fixed_etf(config)
    with torch.no_grad():
        return {"accuracy": accuracy, "num_train": len(y), **_measure_fixed_etf(network, x, y, config)}


def _measure_fixed_etf(network: FixedETFNetwork, x: torch.Tensor, y: torch.Tensor, config: NcMixupConfig) -> dict:
    network.train()  # as the paper reads features (no dropout or normalisation here: the same as eval)
    head = network.head.double()
    num_classes = len(head)
    generator = torch.Generator().manual_seed(config.seed + 1)
    classes = tuple(range(num_classes))
    grid, n = torch.tensor(config.lambda_grid, dtype=torch.float64), config.pairs_per_lambda
    # The part of a feature the classifier reads: its projection onto the row space of W. Directions outside it
    # (d - K + 1 of them) get no gradient from the loss, only the slow pull of weight decay; the UFM has none.
    _, row_space = readout(head)
    measured = {"same": [], "different": []}
    same_margins = []
    for lam in grid:
        for kind in measured:
            first, second = draw_pairs(y, classes, n, kind == "same", generator)
            images = torch.cat([x[first], x[second]])
            mixed = mix_images(images, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]), lam.expand(2 * n))[:n]
            h, z = (t.double() for t in network(mixed))
            seen = h @ row_space
            i, j = y[first], y[second]
            rows = torch.arange(n)
            w_i, w_j = head[i], head[j]
            if kind == "same":
                others = z.masked_fill(torch.nn.functional.one_hot(i, num_classes).bool(), float("nan"))
                margin = z[rows, i] - others.nanmean(1)
                same_margins.append(margin)
                # the class means of the mixes, as neural collapse measures alignment, free of per-example noise
                means = torch.stack([seen[i == c].mean(0) for c in i.unique()])
                measured[kind].append({
                    "lambda": float(lam),
                    "cosine": float(torch.nn.functional.cosine_similarity(seen, w_i, dim=1).mean()),
                    "mean_cosine": float(torch.nn.functional.cosine_similarity(means, head[i.unique()], dim=1).mean()),
                    "cosine_full": float(torch.nn.functional.cosine_similarity(h, w_i, dim=1).mean()),
                    "norm": float(seen.norm(dim=1).mean()), "margin": float(margin.mean())})
            else:
                basis = torch.linalg.qr(torch.stack([w_i, w_j], 2)).Q  # (n, d, 2): span{w_i, w_j}
                inside = torch.einsum("ndk,nd->nk", basis, seen).norm(dim=1) / seen.norm(dim=1)
                measured[kind].append({"lambda": float(lam), "gap": float((z[rows, i] - z[rows, j]).mean()),
                                       "in_span": float(inside.mean())})
    mean_norm = sum(r["norm"] for r in measured["same"]) / len(measured["same"])
    for r in measured["same"]:
        r["relative_norm"] = r["norm"] / mean_norm
    margin = float(torch.cat(same_margins).mean())
    scale = scale_from_margin(margin, num_classes)
    optimum = optimal_mixup_logits(scale, grid, 0, 1, num_classes)
    for r, z in zip(measured["different"], optimum):
        r["predicted_gap"] = float(z[0] - z[1])
    gaps = torch.tensor([r["gap"] for r in measured["different"]], dtype=torch.float64)
    # Fig. 1's picture of this network: mixed training pairs of three classes, lambda ~ Beta(alpha, alpha)
    classes = _three_classes(config, num_classes, generator)
    kinds = mixed_pairs(network, x, y, classes, num_classes, config, generator)
    return {
        "num_classes": num_classes, "scale": scale, "margin": margin,
        "same": measured["same"], "different": measured["different"],
        "same_cosine_mean": float(sum(r["cosine"] for r in measured["same"]) / len(grid)),
        "same_mean_cosine_mean": float(sum(r["mean_cosine"] for r in measured["same"]) / len(grid)),
        "same_mean_cosine_spread": max(r["mean_cosine"] for r in measured["same"]) - min(
            r["mean_cosine"] for r in measured["same"]),
        "same_norm_spread": max(r["relative_norm"] for r in measured["same"]) - min(
            r["relative_norm"] for r in measured["same"]),
        "different_crossing_lambda": crossing_lambda(grid, gaps),
        "different_gap_at_half": next((r["gap"] for r in measured["different"] if r["lambda"] == 0.5), None),
        "different_gap_error": float(max(abs(r["gap"] - r["predicted_gap"]) for r in measured["different"])),
        "different_in_span_mean": float(sum(r["in_span"] for r in measured["different"]) / len(grid)),
        "pairs": pair_report(kinds, head, classes),
    }
