"""Batched image augmentations on (batch, channels, height, width) tensors, driven by an explicit generator
so that a resumed run draws exactly what the uninterrupted run drew."""

from __future__ import annotations

from dataclasses import dataclass

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


def sample_beta(alpha: float, generator: torch.Generator, size: int | None = None) -> float | torch.Tensor:
    """One draw of Beta(alpha, alpha) (the mixing weight of mixup / cutmix) from the step's generator, or a float64
    tensor of `size` draws."""
    # torch has no seeded Beta sampler; derive a numpy generator from the torch one.
    import numpy as np

    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    if size is None:
        return float(rng.beta(alpha, alpha))
    return torch.from_numpy(rng.beta(alpha, alpha, size=size))


def cutmix_boxes(lam: torch.Tensor, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """CutMix boxes (Yun et al. 2019, Algorithm A1): per weight lam, a box of sides sqrt(1 - lam) times the image's,
    centred at a uniform pixel and clipped to the image. Returns (batch, 4) long rows (y1, y2, x1, x2)."""
    cut = (1 - lam).clamp(0, 1).sqrt()
    cut_h, cut_w = (height * cut).long(), (width * cut).long()
    cy = torch.randint(height, lam.shape, generator=generator)
    cx = torch.randint(width, lam.shape, generator=generator)
    return torch.stack([(cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height),
                        (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)], dim=1)


def mix_images(images: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Input mixup: lam[i] * images[i] + (1 - lam[i]) * images[partner[i]], for images of any shape (batch, ...)."""
    weight = lam.to(images).reshape(-1, *[1] * (images.ndim - 1))
    return weight * images + (1 - weight) * images[partner]


@dataclass
class MixedBatch:
    """A mixed batch: example i is lam[i] of itself and 1 - lam[i] of example partner[i]."""

    pixel_values: torch.Tensor  # (batch, channels, height, width)
    targets: torch.Tensor  # (batch, num_classes) soft targets: lam * y_i + (1 - lam) * y_partner
    lam: torch.Tensor  # (batch,) the weight of each example's own image and label (after CutMix: its area)
    partner: torch.Tensor  # (batch,) long: the example each one is mixed with
    cutmix: bool  # whether the batch was mixed by CutMix (else by mixup)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The mixup loss lam * CE(logits, y_i) + (1 - lam) * CE(logits, y_partner), averaged over the batch."""
        return -(self.targets.to(logits.dtype) * logits.log_softmax(-1)).sum(-1).mean()


class MixupCutmix:
    """mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) for any image classifier, on a collated batch.

    Every draw comes from the generator passed in (the engine's step generator in `compute_loss`), so a resumed run
    mixes exactly as the uninterrupted one. Each example is paired with a random permutation of the batch (as in
    the mixup paper's code); lam ~ Beta(alpha, alpha), once per batch or, with `per_example`, once per example.
    With both alphas above 0, CutMix is chosen with probability `switch_prob` per batch (timm's rule). A CutMix
    weight is corrected to the box's true area after clipping, so the targets match the pixels.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0, per_example: bool = False):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
        if not (mixup_alpha >= 0 and cutmix_alpha >= 0 and mixup_alpha + cutmix_alpha > 0):
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 with at least one above 0, got "
                             f"mixup_alpha={mixup_alpha!r}, cutmix_alpha={cutmix_alpha!r}")
        if not 0 <= switch_prob <= 1:
            raise ValueError(f"switch_prob must lie in [0, 1], got {switch_prob!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.switch_prob, self.label_smoothing, self.per_example = switch_prob, label_smoothing, per_example

    def targets(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(batch, num_classes) one-hot targets, label-smoothed."""
        off = self.label_smoothing / self.num_classes
        one_hot = torch.full((len(labels), self.num_classes), off, dtype=dtype)
        return one_hot.scatter_(1, labels[:, None], 1.0 - self.label_smoothing + off)

    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 partner: torch.Tensor | None = None) -> MixedBatch:
        """pixel_values: (batch, channels, height, width) floats; labels: (batch,) class indices; `partner`: the
        example each one is mixed with (default: a random permutation of the batch)."""
        if not torch.is_floating_point(pixel_values) or pixel_values.ndim != 4 or len(pixel_values) == 0:
            raise ValueError("mixing needs float pixel_values (batch, channels, height, width) with batch >= 1, got "
                             f"{pixel_values.dtype} {tuple(pixel_values.shape)}")
        if labels.shape != (len(pixel_values),) or labels.is_floating_point():
            raise ValueError(f"mixing needs labels of shape ({len(pixel_values)},) (class indices), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        batch, _, height, width = pixel_values.shape
        if partner is None:
            partner = torch.randperm(batch, generator=generator)
        elif partner.shape != (batch,) or partner.is_floating_point() or not 0 <= int(partner.min()) <= int(
                partner.max()) < batch:
            raise ValueError(f"partner must be ({batch},) indices into the batch, got {partner.dtype} "
                             f"{tuple(partner.shape)}")
        partner = partner.cpu()
        cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or torch.rand(1, generator=generator).item() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = (sample_beta(alpha, generator, size=batch) if self.per_example else
               torch.full((batch,), sample_beta(alpha, generator), dtype=torch.float64))
        if cutmix:
            boxes = cutmix_boxes(lam, height, width, generator)
            rows, cols = torch.arange(height), torch.arange(width)
            inside = (((rows >= boxes[:, :1]) & (rows < boxes[:, 1:2]))[:, :, None]
                      & ((cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:]))[:, None, :])
            mixed = torch.where(inside[:, None].to(pixel_values.device), pixel_values[partner], pixel_values)
            lam = 1 - inside.flatten(1).double().mean(1)  # the pasted box's true area
        else:
            mixed = mix_images(pixel_values, partner, lam)
        one_hot = self.targets(labels.cpu(), torch.float64)
        targets = lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot[partner]
        device = pixel_values.device
        return MixedBatch(mixed, targets.to(device, pixel_values.dtype), lam.to(device), partner.to(device), cutmix)
