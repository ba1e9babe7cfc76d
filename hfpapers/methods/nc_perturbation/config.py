"""The settings of Perturbation Analysis of Neural Collapse (no torch import: the package stays cheap to import)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["NcPerturbationConfig", "SPLITS", "LAYERWISE_LOSSES"]

SPLITS = ("train", "test")
LAYERWISE_LOSSES = ("mse", "ce")


@dataclass
class NcPerturbationConfig:
    """Defaults are the paper's Fig. 1 setting (beta = 100, K = 4, d = 10, n = 10, lambda_W = sqrt(2)) for the
    synthetic parts; the paper's Fig. 1 lambda_H values and App. E.1's layer-wise training details were not
    available, so `spectrum_lambda_H`, the layer-wise optimiser and the decays on the given classifier are chosen
    here. The record's presets set the rest."""

    # (a) The given classifier: its penultimate features on the first `num_examples` examples of `split` are H0;
    # Eq. 2 is solved for each beta and NC1 of H* is compared with NC1 of H0 (Cor. 3.2).
    num_examples: int = 1000
    batch_size: int = 256
    split: str = "train"  # neural collapse is a training-data phenomenon
    lambda_W: float = math.sqrt(2)  # the classifier's decay in Eq. 1-2
    lambda_H: float = 0.1  # the features' decay in Eq. 1-2 (> 0: the synthetic H0 is Thm 2.1's minimiser)
    betas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
    solver_tolerance: float = 1e-9  # relative stationarity residual of the alternating solver
    solver_max_iterations: int = 5000
    # (b) Synthetic: H0 = the collapsed minimiser of Thm 2.1 plus within-class Gaussian noise of std `noise`
    # (relative to the class means' norm sqrt(rho)); F at the collapsed point against Thm 4.2, and the central
    # path from H0 against Thm 3.1.
    num_classes: int = 4  # K
    feature_dim: int = 10  # d
    samples_per_class: int = 10  # n
    noise: float = 0.3
    spectrum_beta: float = 100.0
    spectrum_lambda_H: tuple[float, ...] = (0.01, 0.1, 0.5)  # lambda_H of Fig. 1's curves (lambda_W above)
    flow_time: float = 10.0  # the central path is followed over [0, flow_time]
    flow_points: int = 21
    # (c) A layer-wise MLP on the embedded digits (paper §5, Fig. 2): hidden layer l is trained with a fresh linear
    # head on top of the frozen layers 1..l-1, and NC1 of its output is measured on the training set.
    layerwise_layers: int = 3
    layerwise_width: int = 64
    layerwise_epochs: int = 100  # full-batch steps per added layer
    layerwise_learning_rate: float = 1e-2
    layerwise_weight_decay: float = 5e-4
    layerwise_loss: str = "mse"  # the loss of the paper's model (Eq. 1); "ce" for cross-entropy
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.spectrum_lambda_H = tuple(float(v) for v in self.spectrum_lambda_H)
        positive = ("num_examples", "batch_size", "solver_max_iterations", "num_classes", "feature_dim",
                    "samples_per_class", "layerwise_layers", "layerwise_width", "layerwise_epochs")
        bad = [n for n in positive if getattr(self, n) < 1]
        bad += [n for n in ("lambda_W", "lambda_H", "solver_tolerance", "spectrum_beta", "flow_time",
                            "layerwise_learning_rate") if not getattr(self, n) > 0]
        bad += [n for n in ("noise", "layerwise_weight_decay") if not getattr(self, n) >= 0]
        if self.flow_points < 2:
            bad.append("flow_points")
        if bad:
            raise ValueError(f"NcPerturbationConfig: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of "
                             "range (sizes and counts >= 1, flow_points >= 2, lambda_W, lambda_H, tolerances, beta, "
                             "times and learning rates > 0, noise and decays >= 0)")
        if not self.betas or min(self.betas) <= 0:
            raise ValueError(f"betas must be one or more positive values of beta (Eq. 2); got {self.betas!r}")
        if not self.spectrum_lambda_H or min(self.spectrum_lambda_H) <= 0:
            raise ValueError(f"spectrum_lambda_H must be one or more positive lambda_H values; got "
                             f"{self.spectrum_lambda_H!r}")
        # Thm 2.1: the collapsed minimiser the synthetic parts start from is non-zero only below this bound
        largest = max(self.lambda_H, *self.spectrum_lambda_H)
        if largest * self.lambda_W >= 1:
            raise ValueError(f"lambda_H * lambda_W must stay below 1 (Thm 2.1: otherwise the UFM minimiser is "
                             f"W = H = 0); got lambda_W={self.lambda_W} with lambda_H up to {largest}")
        if self.num_classes < 2 or self.feature_dim <= self.num_classes:
            raise ValueError(f"Thm 4.2 needs K >= 2 classes and feature_dim > K; got num_classes={self.num_classes}, "
                             f"feature_dim={self.feature_dim}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {self.split!r}")
        if self.layerwise_loss not in LAYERWISE_LOSSES:
            raise ValueError(f"layerwise_loss must be one of {', '.join(LAYERWISE_LOSSES)}; got "
                             f"{self.layerwise_loss!r}")
