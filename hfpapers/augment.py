"""Batched image augmentations on (batch, channels, height, width) tensors, driven by an explicit generator
so that a resumed run draws exactly what the uninterrupted run drew."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_resized_crop(images: torch.Tensor, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """Per image: a crop of random area fraction `scale` and aspect `ratio`, resized back to the input size.

    images: (batch, channels, height, width). Done as one batched bilinear resampling (an affine grid per
    image); a crop that would not fit inside the image is clamped to it.
    """
    batch, _, height, width = images.shape
    area = torch.empty(batch).uniform_(*scale, generator=generator)  # fraction of the image
    aspect = torch.empty(batch).uniform_(*torch.tensor(ratio).log().tolist(), generator=generator).exp()
    frac_w = (area * aspect * height / width).sqrt().clamp(max=1.0)  # crop width / image width
    frac_h = (area / aspect * width / height).sqrt().clamp(max=1.0)
    # Crop centres in [-1, 1] grid coordinates, drawn so the crop stays inside the image.
    centre_x = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - frac_w)
    centre_y = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - frac_h)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = frac_w, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = frac_h, centre_y
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def horizontal_flip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Each image mirrored left-right with probability p."""
    flip = torch.rand(len(images), generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) (the mixing weight of mixup / cutmix) from the step's generator."""
    # torch has no seeded Beta sampler; derive a numpy generator from the torch one.
    import numpy as np

    return float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator))).beta(alpha, alpha))
