"""The image-classification recipe a TrAct run trains both of its arms with (the baseline's training)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine import ImageClassificationRecipe

__all__ = ["TrActRecipe"]


@dataclass
class TrActRecipe(ImageClassificationRecipe):
    optimizer: str = "sgd"  # sgd (with momentum) | adamw
    momentum: float = 0.9

    def build_optimizer(self, model: torch.nn.Module, args) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=self.momentum,
                                   weight_decay=args.weight_decay)
        return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
