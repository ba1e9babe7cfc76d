"""The settings of the deep-linear neural-collapse analysis (no torch import: the package stays cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NcDeepLinearConfig", "LOSSES", "SPLITS"]

LOSSES = ("mse", "ce")
SPLITS = ("train", "test")


@dataclass
class NcDeepLinearConfig:
    """Defaults are the official synthetic scripts' (`synthetic_experiment_balanced.py` /
    `synthetic_experiment_imbalanced.py`: SGD lr 0.1 momentum 0.9, full batch, H and every W_m drawn from
    N(0, 0.1^2), lambda_W = lambda_H = 5e-4, 30,000 iterations, seed 2, class counts [100]*4 and [200, 100, 50, 50]);
    the README's imbalanced runs use depth in {1, 3, 6, 9} and d = 2048, which only M = 1 survives at lr 0.1. The
    record's presets set the rest."""

    # (a) The given classifier: NC metrics of the features entering its head (and its trailing linear layers),
    # on the first `num_examples` examples of `split` (neural collapse is a training-data phenomenon).
    num_examples: int = 1000
    batch_size: int = 256
    split: str = "train"
    # (b) Unconstrained features model (UFM), solved directly: H (N x d) and W_1..W_M.
    hidden: int = 64  # d
    depths: tuple[int, ...] = (1, 3, 6, 9)  # M, the number of linear layers
    num_iterations: int = 30000
    learning_rate: float = 0.1
    momentum: float = 0.9
    init_std: float = 0.1
    weight_decay: float = 5e-4  # lambda_W, the same for every W_m
    feature_decay: float = 5e-4  # lambda_H
    balanced_counts: tuple[int, ...] = (100, 100, 100, 100)
    imbalanced_counts: tuple[int, ...] = (200, 100, 50, 50)
    # lambda_W = lambda_H of the minority-collapse arm: class k collapses iff n_k <= N^2 lambda_W lambda_H (M = 1);
    # 0.02 with the official counts puts the threshold at 64, between the 50- and 100-sample classes.
    minority_decay: float = 0.02
    losses: tuple[str, ...] = LOSSES  # balanced arms; the imbalanced closed form is the MSE loss's
    record_every: int = 100  # iterations between two NC measurements of the curves
    seed: int = 2
    # (c) An MLP (ReLU feature extractor + `digits_depth_linear` linear layers) trained on the embedded digits with
    # the official MLP runs' MSE loss and Adam, NC measured after every epoch.
    digits_epochs: int = 30
    digits_width: int = 64
    digits_depth_relu: int = 3
    digits_depth_linear: int = 3
    digits_learning_rate: float = 1e-3
    digits_weight_decay: float = 1e-4

    def __post_init__(self):
        self.depths = tuple(self.depths)
        self.balanced_counts = tuple(self.balanced_counts)
        self.imbalanced_counts = tuple(self.imbalanced_counts)
        self.losses = tuple(self.losses)
        positive = ("num_examples", "batch_size", "hidden", "num_iterations", "record_every", "digits_epochs",
                    "digits_width", "digits_depth_relu", "digits_depth_linear")
        bad = [n for n in positive if getattr(self, n) < 1]
        bad += [n for n in ("learning_rate", "init_std", "digits_learning_rate") if not getattr(self, n) > 0]
        bad += [n for n in ("weight_decay", "feature_decay", "minority_decay", "digits_weight_decay")
                if not getattr(self, n) >= 0]
        if not 0 <= self.momentum < 1:
            bad.append("momentum")
        if bad:
            raise ValueError(f"NcDeepLinearConfig: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of "
                             "range (sizes, counts and learning rates are positive, decays >= 0, momentum in [0, 1))")
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths must be one or more numbers of linear layers >= 1; got {self.depths!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {self.split!r}")
        unknown = [loss for loss in self.losses if loss not in LOSSES]
        if unknown or not self.losses:
            raise ValueError(f"losses must be some of {', '.join(LOSSES)}; got {self.losses!r}")
        for name in ("balanced_counts", "imbalanced_counts"):
            counts = getattr(self, name)
            if len(counts) < 2 or min(counts) < 1:
                raise ValueError(f"{name} must give at least two classes, each with at least one sample (a class "
                                 f"with no samples has no mean); got {counts!r}")
            if len(counts) > self.hidden:
                raise ValueError(f"{name} has K={len(counts)} classes but hidden={self.hidden}: the orthogonal "
                                 "frame the UFM collapses to needs K <= d")
