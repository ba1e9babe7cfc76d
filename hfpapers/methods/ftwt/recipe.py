"""The training recipe of FTWT (official cifar.py and job_dynamic.sh of github.com/selkerdawy/FTWT).

Loss: cross-entropy on the masked network plus `mask_loss_weight` x the mask loss (BCE of every unit's predictor
against its self-supervised target), the latter switched off from `cooldown` of the run on (`--cooldown 0.5`:
`mask_weight = 0.0 if epoch >= int(cooldown * epochs) else 1`), which freezes what the predictors learnt.
Optimiser: SGD with momentum 0.9 in two groups, the backbone at the run's learning rate and weight decay with
steps of x0.1 at `lr_milestones` (81/122/151 of 200 epochs), the predictors (`mask_predictors.*`, the official
"Mask" parameters) at a constant `mask_learning_rate` (0.1) without weight decay. Augmentation: random crops of
zero-padded images (padding 4) and horizontal flips, as the official CIFAR loader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers import ViTImageProcessorPil

from ...augment import horizontal_flip
from ...engine import Callback, ImageClassificationRecipe

# Official CIFAR-10 normalisation (get_datasetloaders in utils/utils.py).
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def build_image_processor(config) -> ViTImageProcessorPil:
    """Resize to the model's side, scale to [0, 1], normalise with the official CIFAR mean/std."""
    if config.num_channels != 3:
        raise ValueError(f"the image processor produces RGB images; the config expects {config.num_channels} channels")
    return ViTImageProcessorPil(size={"height": config.image_size, "width": config.image_size},
                                image_mean=list(CIFAR_MEAN), image_std=list(CIFAR_STD), do_convert_rgb=True)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding): each image zero-padded by `padding` and cropped back at a random
    offset."""
    if padding == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (len(images), 2), generator=generator)
    return torch.stack([image[:, top:top + height, left:left + width]
                        for image, (top, left) in zip(padded, offsets.tolist())])


class DenseWarmup(Callback):
    """Train the first `dense_epochs` without applying the masks (the predictors still learn their targets), the
    stand-in for the official code's pretrained baseline when a run starts from scratch."""

    def __init__(self, dense_epochs: int):
        self.dense_epochs = dense_epochs

    def _set(self, state, model):
        extract_model_from_parallel(model).config.masking = state.epoch >= self.dense_epochs

    def on_train_begin(self, state, model, accelerator):
        self._set(state, model)

    def on_epoch_end(self, state, model, accelerator):
        self._set(state, model)


@dataclass
class FTWTRecipe(ImageClassificationRecipe):
    mask_learning_rate: float = 0.1
    mask_loss_weight: float = 1.0
    cooldown: float = 0.5  # share of the epochs after which the mask loss is off
    momentum: float = 0.9
    lr_milestones: tuple[float, ...] = (81 / 200, 122 / 200, 151 / 200)  # shares of the run; x0.1 at each
    crop_padding: int = 4
    dense_epochs: int = 0  # epochs without masks first (0: start masked, from a trained baseline as the paper)

    metric = "accuracy"

    def __post_init__(self):
        self.lr_milestones = tuple(self.lr_milestones)
        bad = {name: value for name, value in (("mask_learning_rate", self.mask_learning_rate),
                                               ("mask_loss_weight", self.mask_loss_weight),
                                               ("crop_padding", self.crop_padding),
                                               ("dense_epochs", self.dense_epochs)) if value < 0}
        if not 0 <= self.cooldown <= 1:
            bad["cooldown"] = self.cooldown
        if not 0 <= self.momentum < 1:
            bad["momentum"] = self.momentum
        if bad:
            raise ValueError(f"FTWTRecipe: {bad} out of range (cooldown in [0, 1], momentum in [0, 1), rates, "
                             "weights, padding and epochs >= 0)")
        if not all(0 < m < 1 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ValueError(f"lr_milestones must be increasing shares of the run in (0, 1), got {self.lr_milestones}")

    def check_arguments(self, args):
        if self.dense_epochs >= args.num_epochs:
            raise ValueError(f"dense_epochs ({self.dense_epochs}) must be fewer than num_epochs ({args.num_epochs}): "
                             "the last epochs train the masked network")

    def callbacks(self):
        return [DenseWarmup(self.dense_epochs)] if self.dense_epochs else []

    def build_optimizer(self, model, args):
        backbone, predictors = [], []
        for name, param in model.named_parameters():
            (predictors if "mask_predictors." in name else backbone).append(param)
        return torch.optim.SGD([{"params": backbone, "lr": args.learning_rate, "weight_decay": args.weight_decay},
                                {"params": predictors, "lr": self.mask_learning_rate, "weight_decay": 0.0}],
                               momentum=self.momentum)

    def build_scheduler(self, optimizer, args, total_steps, steps_per_epoch):
        milestones = [int(m * args.num_epochs) * steps_per_epoch for m in self.lr_milestones]

        def backbone(step: int) -> float:
            return 0.1 ** sum(step >= m for m in milestones)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, [backbone, lambda step: 1.0])

    def mask_weight(self, state) -> float:
        """The official schedule: the mask loss counts until `cooldown` of the epochs, then not at all."""
        return 0.0 if state.epoch >= int(self.cooldown * state.num_epochs) else self.mask_loss_weight

    def compute_loss(self, model, batch, step_rng, state):
        images = horizontal_flip(random_crop(batch["pixel_values"], self.crop_padding, step_rng), step_rng)
        outputs = model(pixel_values=images)
        loss = F.cross_entropy(outputs.logits, batch["labels"])
        weight = self.mask_weight(state)
        return loss + weight * outputs.mask_loss if weight else loss

    def eval_outputs(self, model, batch):
        unwrapped = extract_model_from_parallel(model)
        outputs = model(pixel_values=batch["pixel_values"])
        loss = F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="none")
        dense = torch.full_like(outputs.macs, float(unwrapped.dense_macs()))
        return {"predictions": outputs.logits.argmax(-1), "labels": batch["labels"], "loss": loss,
                "macs": outputs.macs, "dense_macs": dense}

    def compute_metrics(self, outputs):
        metrics = super().compute_metrics(outputs)
        # FLOPs skipped per image by the predicted masks (predictor cost not subtracted; it is reported apart)
        metrics["flops_reduction"] = 1 - (outputs["macs"].sum() / outputs["dense_macs"].sum()).item()
        return metrics
