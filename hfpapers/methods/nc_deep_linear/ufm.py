"""Direct optimisation of the (deep linear) unconstrained features model, as the official synthetic scripts do:
full batch, SGD with momentum, on

    MSE: ||W_M..W_1 H + b 1^T - Y||_F^2 / (2N) + (lambda_W / 2) sum_m ||W_m||_F^2 + (lambda_H / 2) ||H||_F^2
    CE:  mean cross-entropy of the same logits + the same regularisers

(the official scripts train the MSE objective; the paper's balanced result also covers CE)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .deep_linear import UnconstrainedFeatures

__all__ = ["UFMSolution", "solve_ufm", "ufm_labels", "ufm_objective"]


def ufm_labels(counts: Sequence[int]) -> torch.Tensor:
    """(N,) class of each UFM sample: n_k samples of class k (the order does not matter in full batch)."""
    counts = [int(n) for n in counts]
    if len(counts) < 2 or min(counts) < 1:
        raise ValueError(f"class counts must give at least two classes, each with at least one sample; got {counts}")
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def ufm_objective(model: UnconstrainedFeatures, labels: torch.Tensor, loss: str, weight_decay: float,
                  feature_decay: float) -> torch.Tensor:
    logits = model()
    if loss == "mse":
        targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        data = (logits - targets).square().sum() / (2 * len(labels))
    elif loss == "ce":
        data = F.cross_entropy(logits, labels)
    else:
        raise ValueError(f"loss must be 'mse' or 'ce'; got {loss!r}")
    return data + model.regulariser(weight_decay, feature_decay)


@dataclass
class UFMSolution:
    model: UnconstrainedFeatures
    labels: torch.Tensor  # (N,)
    objective: float  # the objective at the last iterate
    history: list[dict] = field(default_factory=list)  # {"iteration": t, **measure(model, labels)}


def solve_ufm(counts: Sequence[int], *, hidden: int, depth: int, loss: str = "mse", bias: bool = False,
              weight_decay: float = 5e-4, feature_decay: float = 5e-4, learning_rate: float = 0.1,
              momentum: float = 0.9, init_std: float = 0.1, num_iterations: int = 30000, seed: int = 2,
              record_every: int | None = None,
              measure: Callable[[UnconstrainedFeatures, torch.Tensor], dict] | None = None) -> UFMSolution:
    """Minimise the UFM objective over H and W_1..W_M (float64) from the official initialisation; `measure`
    (model, labels) -> dict is recorded every `record_every` iterations and after the last one."""
    labels = ufm_labels(counts)
    if len(counts) > hidden:
        raise ValueError(f"K={len(counts)} classes need hidden >= K for the orthogonal frame; got hidden={hidden}")
    generator = torch.Generator().manual_seed(seed)
    model = UnconstrainedFeatures(len(labels), hidden, len(counts), depth, bias=bias, init_std=init_std,
                                  generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    history = []
    for iteration in range(1, num_iterations + 1):
        optimizer.zero_grad(set_to_none=True)
        objective = ufm_objective(model, labels, loss, weight_decay, feature_decay)
        objective.backward()
        optimizer.step()
        if not torch.isfinite(objective):
            raise FloatingPointError(f"the UFM objective diverged at iteration {iteration} (learning_rate="
                                     f"{learning_rate}); lower the learning rate")
        if measure is not None and (iteration == num_iterations or (record_every and iteration % record_every == 0)):
            with torch.no_grad():
                history.append({"iteration": iteration, **measure(model, labels)})
    with torch.no_grad():
        final = ufm_objective(model, labels, loss, weight_decay, feature_decay).item()
    return UFMSolution(model, labels, final, history)
