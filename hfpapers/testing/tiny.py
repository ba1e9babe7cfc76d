"""Tiny inputs for any registered model, by task: what the common model tester feeds every model class."""

from __future__ import annotations

import torch


def tiny_inputs(task: str, config, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random model inputs of the shape `config` expects for `task`."""
    generator = torch.Generator().manual_seed(seed)
    if task == "image-classification":
        shape = (batch_size, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    raise ValueError(f"no tiny inputs for task {task!r}; add them to hfpapers.testing.tiny")


def wrong_inputs(task: str, config, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of a wrong shape, which a model must reject with an error naming the expected shape."""
    if task == "image-classification":
        return {"pixel_values": torch.randn(batch_size, config.num_channels, config.image_size + 1, config.image_size)}
    raise ValueError(f"no wrong inputs for task {task!r}; add them to hfpapers.testing.tiny")
