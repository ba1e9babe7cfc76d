"""The settings of a TrAct run (no torch import: the package stays cheap to import)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TractConfig", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TractConfig:
    """`l` is the paper's lambda (§3, Eq. 5; 0.1 recommended, 0.2 for long runs, searched in {0.05, 0.1, 0.2});
    everything else is the baseline's training, which TrAct leaves as it is (§4: "all other hyperparameters are
    the baseline's optimum"). The defaults are the paper's CIFAR-10 ResNet-18 setting with SGD (Fig. 3: lr 0.08,
    momentum 0.9, batch 128, cosine schedule, 100 epochs)."""

    l: float = 0.1
    layer: str | None = None  # the layer TrAct trains; None: the model's first layer (`find_first_layer`)
    # Train the model's architecture from a fresh initialisation (the paper trains from scratch); False continues
    # from the given weights.
    from_scratch: bool = True
    # Also train the same model without TrAct (same initial weights, data order and settings): the comparison.
    baseline: bool = True
    num_epochs: int = 100
    learning_rate: float = 0.08
    optimizer: str = "sgd"  # sgd (momentum) | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    lr_scheduler: str = "cosine"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.l, bool) or not isinstance(self.l, (int, float)) or not math.isfinite(self.l) \
                or self.l <= 0:
            raise ValueError(f"l (TrAct's lambda) must be a finite number above 0, got {self.l!r}")
        checks = {"num_epochs": self.num_epochs >= 1, "batch_size": self.batch_size >= 1,
                  "learning_rate": self.learning_rate > 0, "momentum": 0 <= self.momentum < 1,
                  "weight_decay": self.weight_decay >= 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TractConfig: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of range "
                             "(epochs, batch size and learning rate positive, momentum in [0, 1), weight decay >= 0)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.layer is not None and not (isinstance(self.layer, str) and self.layer):
            raise ValueError(f"layer must be a module name such as 'embeddings.patch_embeddings.projection' (or "
                             f"None for the first layer), got {self.layer!r}")
