"""The settings of the mixup neural-collapse analysis (no torch import: the package stays cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NcMixupConfig", "SPLITS", "OPTIMIZERS"]

SPLITS = ("train", "test")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class NcMixupConfig:
    """Defaults follow the paper's protocol (Fisher, Meng and Papyan, ICLR 2024): input mixup with lambda ~
    Beta(1, 1), last-layer features of mixed *training* examples read with the model in train mode, three random
    classes; the fixed-ETF network trains with SGD lr 0.1, momentum 0.9, weight decay 1e-4, the rate divided by 10
    at 30 / 50 / 90 % of 500 epochs (the protocol of the third-party re-implementation sdraeger/nc-mixup-loss-function;
    the paper's own notebook was not readable here). The record's `fast` preset shortens the run for CPU."""

    # (a) The given classifier: mixed pairs of three classes of `split`, their features at the head's input.
    split: str = "train"  # the paper reads training data
    num_examples: int = 2000  # first examples of `split` the pairs are drawn from
    classes: tuple[int, ...] | None = None  # the three classes projected; None: three drawn with `seed`
    num_pairs: int = 600  # mixed pairs per kind (same class, different classes)
    mixup_alpha: float = 1.0  # lambda ~ Beta(alpha, alpha) for the pairs and for training (the paper: 1)
    train_mode: bool = True  # the paper reads the features with the model in train mode
    batch_size: int = 256
    # (b) The paper's fixed simplex-ETF classifier: an MLP feature extractor trained with mixup on the embedded
    # digits against a frozen ETF head (unit rows, no bias); features of mixed training pairs on a lambda grid.
    hidden_size: int = 256
    num_hidden_layers: int = 2
    feature_dim: int = 16  # d >= K: the ETF is placed in R^d by a fixed random orthonormal map
    num_epochs: int = 500
    train_batch_size: int = 128
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.3, 0.5, 0.9)  # fractions of the run where the rate is divided by 10
    lambda_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    pairs_per_lambda: int = 200  # mixed pairs of each kind measured at each grid value
    seed: int = 0

    def __post_init__(self):
        if self.classes is not None:
            self.classes = tuple(self.classes)
        self.lr_milestones = tuple(self.lr_milestones)
        self.lambda_grid = tuple(self.lambda_grid)
        positive = ("num_examples", "num_pairs", "batch_size", "hidden_size", "num_hidden_layers", "feature_dim",
                    "num_epochs", "train_batch_size", "pairs_per_lambda")
        bad = [n for n in positive if isinstance(getattr(self, n), bool) or getattr(self, n) < 1]
        bad += [n for n in ("mixup_alpha", "learning_rate") if not getattr(self, n) > 0]
        if not self.weight_decay >= 0:
            bad.append("weight_decay")
        if not 0 <= self.momentum < 1:
            bad.append("momentum")
        if bad:
            raise ValueError(f"NcMixupConfig: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of range "
                             "(sizes, counts, alpha and the learning rate are positive, weight_decay >= 0, momentum "
                             "in [0, 1))")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {self.split!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.classes is not None and (len(self.classes) != 3 or len(set(self.classes)) != 3
                                         or min(self.classes) < 0):
            raise ValueError(f"classes must be three different class indices (the paper projects three classes), "
                             f"or None for three random ones; got {self.classes!r}")
        if not self.lambda_grid or not all(0 < lam < 1 for lam in self.lambda_grid):
            raise ValueError(f"lambda_grid must hold mixing weights strictly between 0 and 1; got {self.lambda_grid!r}")
        if not all(0 < m < 1 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ValueError(f"lr_milestones must be increasing fractions of the run in (0, 1); got "
                             f"{self.lr_milestones!r}")
        # The digits have 10 classes: a simplex ETF of K vectors needs K - 1 <= d; d >= K keeps its embedding exact.
        if self.feature_dim < 10:
            raise ValueError(f"feature_dim={self.feature_dim} is below the 10 classes of the digits: the fixed "
                             "simplex-ETF head needs feature_dim >= K")
