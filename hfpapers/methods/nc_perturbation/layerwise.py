"""The paper's layer-wise MLP (§5, Fig. 2): hidden layers added one at a time, each trained with a fresh linear
head on top of the frozen layers below it; the perturbation model reads each new layer as a small sub-network
H0 -> H, so NC1 of the deepest features should fall as layers are added."""

from __future__ import annotations

import numpy as np
import torch

from ...analysis.neural_collapse import ClassStatistics, nc1, nc1_trace_ratio

__all__ = ["image_matrix", "collapse_of", "train_layerwise_mlp"]


def image_matrix(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(X (N, pixels) in [0, 1], labels (N,)) of an image dataset with "image" and "label" columns."""
    if not {"image", "label"} <= set(dataset.column_names):
        raise ValueError(f"the layer-wise MLP needs 'image' and 'label' columns; got {dataset.column_names}")
    X = np.stack([np.asarray(image.convert("L"), dtype=np.float32).reshape(-1) / 255 for image in dataset["image"]])
    return torch.from_numpy(X), torch.as_tensor(dataset["label"])


def collapse_of(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """NC1 = (1/K) tr(Sigma_W Sigma_B^+) and the theory's trace ratio tr(Sigma_W) / tr(Sigma_B) (Eq. 3) of
    features (N, d)."""
    stats = ClassStatistics.from_features(features.to(torch.float64), labels, num_classes)
    return {"nc1": nc1(stats), "nc1_trace_ratio": nc1_trace_ratio(stats)}


def train_layerwise_mlp(X: torch.Tensor, labels: torch.Tensor, num_classes: int, *, layers: int, width: int,
                        epochs: int, learning_rate: float, weight_decay: float, loss: str = "mse",
                        seed: int = 0) -> list[dict[str, float]]:
    """Per added layer l = 1..layers: NC1, the trace ratio and the training accuracy of layer l's output (the
    features its head reads). Each stage is `epochs` full-batch Adam steps with L2 decay on the new layer and head."""
    generator = torch.Generator().manual_seed(seed)
    features, rows = X.float(), []
    targets = torch.nn.functional.one_hot(labels, num_classes).float()
    for _ in range(layers):
        layer = torch.nn.Linear(features.shape[1], width)
        head = torch.nn.Linear(width, num_classes)
        for module in (layer, head):  # seeded independently of torch's global generator
            bound = 1 / module.in_features ** 0.5
            module.weight.data.uniform_(-bound, bound, generator=generator)
            module.bias.data.uniform_(-bound, bound, generator=generator)
        parameters = [*layer.parameters(), *head.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)
        for _ in range(epochs):
            logits = head(torch.relu(layer(features)))
            objective = (0.5 * (logits - targets).square().sum(1).mean() if loss == "mse"
                         else torch.nn.functional.cross_entropy(logits, labels))
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
        with torch.no_grad():
            features = torch.relu(layer(features))  # frozen from here on
            accuracy = float((head(features).argmax(1) == labels).float().mean())
        rows.append({**collapse_of(features, labels, num_classes), "accuracy": accuracy})
    return rows
