"""The training recipe of EfficientViM (official classification/main.py and utils/config.py).

AdamW (lr 2e-3, betas 0.9/0.999, weight decay 0.05 on every tensor of two or more dimensions: conv and linear
weights, the gates `alpha` and the LayerNorm weights), per-step schedule: linear warm-up from 2e-6 over 20 epochs,
cosine to 2e-5, then 10 cool-down epochs at 2e-5 (a "300-epoch" run is 310 epochs); gradient clipping at 0.02;
weight EMA with decay 0.9995; random resized crops, flips, random erasing (p 0.25) and mixup 0.8 / cutmix 1.0
(switch 0.5) with label smoothing 0.1. Without a teacher, the official code adds EMA self-distillation (MESA) from a
quarter of training; with one, DeiT hard distillation (alpha 0.5) through the distillation head.
Not reproduced: RandAugment (rand-m9-mstd0.5-inc1), whose PIL operations have no batched tensor form here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel

from ...augment import horizontal_flip, random_resized_crop, sample_beta
from ...engine import ImageClassificationRecipe


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution per example (mixed and smoothed labels, or a teacher's softmax)."""
    return torch.sum(-target * logits.log_softmax(-1), dim=-1).mean()


def mix_batch(images, labels, num_classes, generator, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
              label_smoothing=0.1):
    """timm-style batch mixing: with probability `switch_prob` CutMix, else mixup, with the batch reversed as the
    partner; returns (images, soft targets). CutMix's weight is corrected to the pasted box's true area."""
    off = label_smoothing / num_classes
    one_hot = torch.full((len(labels), num_classes), off, dtype=images.dtype)
    one_hot[torch.arange(len(labels)), labels] = 1.0 - label_smoothing + off
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1, generator=generator).item() < switch_prob)
    if use_cutmix:
        lam = sample_beta(cutmix_alpha, generator)
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy = int(torch.randint(height, (1,), generator=generator))
        cx = int(torch.randint(width, (1,), generator=generator))
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        images = images.clone()
        images[:, :, y1:y2, x1:x2] = images.flip(0)[:, :, y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / (height * width)
    elif mixup_alpha > 0:
        lam = sample_beta(mixup_alpha, generator)
        images = lam * images + (1 - lam) * images.flip(0)
    else:
        return images, one_hot
    return images, lam * one_hot + (1 - lam) * one_hot.flip(0)


def random_erasing(images, generator, p=0.25, area=(0.02, 1 / 3), log_aspect=(math.log(0.3), math.log(1 / 0.3))):
    """Per image with probability p, one rectangle replaced by standard-normal noise (timm's 'pixel' mode on
    normalised images); the rectangle is clamped to the image."""
    images = images.clone()
    height, width = images.shape[-2:]
    for image in images:
        if torch.rand(1, generator=generator).item() >= p:
            continue
        target = torch.empty(1).uniform_(*area, generator=generator).item() * height * width
        aspect = math.exp(torch.empty(1).uniform_(*log_aspect, generator=generator).item())
        h = min(height, max(1, round(math.sqrt(target * aspect))))
        w = min(width, max(1, round(math.sqrt(target / aspect))))
        top = int(torch.randint(height - h + 1, (1,), generator=generator))
        left = int(torch.randint(width - w + 1, (1,), generator=generator))
        image[:, top:top + h, left:left + w] = torch.randn(image[:, top:top + h, left:left + w].shape,
                                                           generator=generator)
    return images


@dataclass
class EfficientViMRecipe(ImageClassificationRecipe):
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_switch_prob: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    random_erasing: float = 0.25
    warmup_epochs: int = 20
    cooldown_epochs: int = 10
    warmup_lr: float = 2e-6
    min_lr: float = 2e-5
    mesa: bool = True  # EMA self-distillation (needs ema_decay), from `mesa_start` of training
    mesa_start: float = 0.25
    mesa_weight: float = 1.0
    teacher: str | None = None  # Hub id or folder of an image classifier: DeiT hard distillation
    distillation_alpha: float = 0.5

    metric = "accuracy"

    def __post_init__(self):
        self._teacher_model = None
        probabilities = {"label_smoothing": self.label_smoothing, "mix_switch_prob": self.mix_switch_prob,
                         "random_erasing": self.random_erasing, "mesa_start": self.mesa_start,
                         "distillation_alpha": self.distillation_alpha}
        bad = {name: value for name, value in probabilities.items() if not 0 <= value <= 1}
        bad.update({name: value for name, value in (("mixup_alpha", self.mixup_alpha),
                                                    ("cutmix_alpha", self.cutmix_alpha),
                                                    ("warmup_epochs", self.warmup_epochs),
                                                    ("cooldown_epochs", self.cooldown_epochs),
                                                    ("mesa_weight", self.mesa_weight)) if value < 0})
        if bad:
            raise ValueError(f"EfficientViMRecipe: {bad} out of range (probabilities in [0, 1]; alphas, weights and "
                             "epochs >= 0)")

    def build_optimizer(self, model, args):
        # As the official grouping: no decay for 1-D tensors and biases (BatchNorm, A, D, fusion weights).
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)

    def check_arguments(self, args):
        if self.warmup_epochs + self.cooldown_epochs >= args.num_epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) + cooldown_epochs ({self.cooldown_epochs}) must "
                             f"be fewer than num_epochs ({args.num_epochs})")

    def build_scheduler(self, optimizer, args, total_steps, steps_per_epoch):
        self.check_arguments(args)
        warmup = self.warmup_epochs * steps_per_epoch
        cooldown = self.cooldown_epochs * steps_per_epoch
        base, cosine = args.learning_rate, total_steps - warmup - cooldown

        def lr_at(step: int) -> float:
            if step < warmup:
                return self.warmup_lr + (base - self.warmup_lr) * step / warmup
            if step < warmup + cosine:
                return self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * (step - warmup) / cosine))
            return self.min_lr

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step) / base)

    def augment(self, pixel_values, labels, num_classes, generator):
        images = horizontal_flip(random_resized_crop(pixel_values, self.crop_scale, (3 / 4, 4 / 3), generator),
                                 generator)
        if self.random_erasing > 0:
            images = random_erasing(images, generator, p=self.random_erasing)
        return mix_batch(images, labels, num_classes, generator, self.mixup_alpha, self.cutmix_alpha,
                         self.mix_switch_prob, self.label_smoothing)

    def teacher_model(self, num_labels: int):
        if self._teacher_model is None:
            from transformers import AutoModelForImageClassification

            self._teacher_model = AutoModelForImageClassification.from_pretrained(self.teacher).eval()
            if self._teacher_model.config.num_labels != num_labels:
                raise ValueError(f"the teacher {self.teacher!r} predicts {self._teacher_model.config.num_labels} "
                                 f"classes, the student {num_labels}")
        return self._teacher_model

    def compute_loss(self, model, batch, step_rng, state):
        config = extract_model_from_parallel(model).config
        images, targets = self.augment(batch["pixel_values"], batch["labels"], config.num_labels, step_rng)
        outputs = model(pixel_values=images)
        loss = soft_target_cross_entropy(outputs.logits, targets)
        if self.teacher is not None:
            if outputs.distillation_logits is None:
                raise ValueError("distillation needs a model with a distillation head: use a `*-dist` preset "
                                 "(config distillation=True)")
            with torch.no_grad():
                teacher_labels = self.teacher_model(config.num_labels)(pixel_values=images).logits.argmax(-1)
            distill = F.cross_entropy(outputs.distillation_logits, teacher_labels)
            return (1 - self.distillation_alpha) * loss + self.distillation_alpha * distill
        if self.mesa and state.ema_model is not None and state.epoch >= int(self.mesa_start * state.num_epochs):
            with torch.no_grad():
                ema_probs = state.ema_model.eval()(pixel_values=images).logits.softmax(-1)
            loss = loss + self.mesa_weight * soft_target_cross_entropy(outputs.logits, ema_probs)
        return loss
