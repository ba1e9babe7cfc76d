"""Deep linear heads: the paper's classifier (a feature extractor followed by M linear layers) and the unconstrained
features model (UFM) it analyses, where the features H are free parameters optimised with W_1..W_M directly.

Both expose the same two views the NC metrics need (official `compute_info` / `W_list`):
`linear_inputs` — the features entering each linear layer, h, W_1 h, ..., W_{M-1}..W_1 h — and `partial_products`
— W_M..W_1, W_M..W_2, ..., W_M, so that `partial_products()[m]` applied to `linear_inputs[m]` gives the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ...analysis import partial_products

__all__ = ["DeepLinearClassifier", "UnconstrainedFeatures"]


def _linear_chain(hidden: int, num_classes: int, depth_linear: int, bias: bool) -> nn.ModuleList:
    """M - 1 bias-free d x d layers and the K x d classifier (bias optional), as the official `fc`."""
    if depth_linear < 1:
        raise ValueError(f"depth_linear must be at least 1 (the classifier itself); got {depth_linear}")
    return nn.ModuleList([*(nn.Linear(hidden, hidden, bias=False) for _ in range(depth_linear - 1)),
                          nn.Linear(hidden, num_classes, bias=bias)])


class DeepLinearClassifier(nn.Module):
    """A ReLU MLP feature extractor followed by `depth_linear` linear layers (official `models/mlp.py`):
    `depth_relu` x (Linear, ReLU, BatchNorm1d) then a BatchNorm1d (`batchnorm=True`) or a Linear (False);
    the heads are M - 1 bias-free d x d layers and a K x d classifier with an optional bias; orthogonal init.

    A plain `nn.Module`: the analysis trains and measures it inside a run; it is not a published model class.

    forward: inputs (batch, input_dim) -> logits (batch, num_classes).
    """

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 512, depth_relu: int = 6,
                 depth_linear: int = 1, bias: bool = True, batchnorm: bool = True):
        super().__init__()
        if min(input_dim, num_classes, hidden, depth_relu) < 1:
            raise ValueError("input_dim, num_classes, hidden and depth_relu must be positive; got "
                             f"{input_dim}, {num_classes}, {hidden}, {depth_relu}")
        layers = []
        for i in range(depth_relu):
            layers += [nn.Linear(input_dim if i == 0 else hidden, hidden), nn.ReLU()]
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.BatchNorm1d(hidden) if batchnorm else nn.Linear(hidden, hidden))
        self.features = nn.Sequential(*layers)
        self.linear = _linear_chain(hidden, num_classes, depth_linear, bias)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight)

    def linear_inputs(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """The M feature matrices (batch, hidden) entering W_1, ..., W_M."""
        if inputs.ndim != 2 or inputs.shape[1] != self.features[0].in_features:
            raise ValueError(f"inputs must be (batch, {self.features[0].in_features}); got {tuple(inputs.shape)}")
        out = [self.features(inputs)]
        for layer in self.linear[:-1]:
            out.append(layer(out[-1]))
        return out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear[-1](self.linear_inputs(inputs)[-1])

    def partial_products(self) -> list[torch.Tensor]:
        """[W_M..W_1, W_M..W_2, ..., W_M] (detached, float64: for measuring)."""
        return partial_products([layer.weight for layer in self.linear])


class UnconstrainedFeatures(nn.Module):
    """The UFM: free features H (N, d) and W_1..W_M, each entry drawn from N(0, init_std^2) (official
    `SyntheticModel`). forward() -> logits (N, K) = H W_1^T .. W_M^T (+ b)."""

    def __init__(self, num_samples: int, hidden: int, num_classes: int, depth_linear: int, bias: bool = False,
                 init_std: float = 0.1, generator: torch.Generator | None = None, dtype=torch.float64):
        super().__init__()
        self.H = nn.Parameter(torch.randn(num_samples, hidden, generator=generator, dtype=dtype) * init_std)
        self.linear = _linear_chain(hidden, num_classes, depth_linear, bias).to(dtype)
        with torch.no_grad():
            for layer in self.linear:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=dtype) * init_std)
                if layer.bias is not None:
                    layer.bias.zero_()

    def linear_inputs(self) -> list[torch.Tensor]:
        out = [self.H]
        for layer in self.linear[:-1]:
            out.append(layer(out[-1]))
        return out

    def forward(self) -> torch.Tensor:
        return self.linear[-1](self.linear_inputs()[-1])

    def partial_products(self) -> list[torch.Tensor]:
        """[W_M..W_1, W_M..W_2, ..., W_M] (detached, float64: for measuring)."""
        return partial_products([layer.weight for layer in self.linear])

    def regulariser(self, weight_decay: float, feature_decay: float) -> torch.Tensor:
        """(lambda_W / 2) sum_m ||W_m||_F^2 + (lambda_H / 2) ||H||_F^2 (the bias is not decayed, as officially)."""
        return (weight_decay / 2 * sum(layer.weight.square().sum() for layer in self.linear)
                + feature_decay / 2 * self.H.square().sum())
