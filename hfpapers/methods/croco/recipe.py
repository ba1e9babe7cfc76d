"""The training recipes of CroCo: cross-view completion pre-training (pretrain.py of the official code) and the
dense head fine-tuned on relative depth from the pre-trained network.

Pre-training: AdamW (betas 0.9, 0.95, weight decay 0.05 except on biases and LayerNorm weights), a cosine schedule
after a linear warm-up, pairs of views normalised with the ImageNet mean and std; the loss is the normalised-patch
MSE over the 90 % masked patches of view 1. Evaluation uses one seeded mask for every pair (`eval_mask_seed`), so
its loss is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine import Recipe, TensorDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_image_processor(config):
    """Resize to `image_size` (bicubic) and normalise with the ImageNet mean and std, as the official pairs loader."""
    from transformers import ViTImageProcessor
    from transformers.image_utils import PILImageResampling

    return ViTImageProcessor(do_resize=True, size={"height": config.image_size, "width": config.image_size},
                             resample=PILImageResampling.BICUBIC, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD))


def _pixels(processor, images) -> torch.Tensor:
    return torch.as_tensor(processor([image.convert("RGB") for image in images], return_tensors="np")["pixel_values"])


def per_pair_masked_loss(logits, target, mask, norm_pix: bool = True) -> torch.Tensor:
    """(batch,) normalised-patch MSE over each pair's masked patches (what the model's loss averages)."""
    from .modeling_croco import patch_errors

    return (patch_errors(logits, target, norm_pix) * mask).sum(1) / mask.sum(1)


@dataclass
class CroCoRecipe(Recipe):
    """Cross-view completion: the model reconstructs view 1's masked patches from its visible ones and view 2."""

    betas: tuple[float, float] = (0.9, 0.95)

    metric = "loss"
    columns = ("image", "reference")
    processor_class = "AutoImageProcessor"

    def prepare_dataset(self, dataset, processor) -> TensorDataset:
        return TensorDataset(pixel_values=_pixels(processor, dataset["image"]),
                             reference_pixel_values=_pixels(processor, dataset["reference"]))

    def build_optimizer(self, model, args):
        # the official `get_parameter_groups` (timm's rule): no decay for biases and LayerNorm weights
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
        return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate, betas=self.betas)

    def compute_loss(self, model, batch, step_rng, state):
        return model(**batch, generator=step_rng).loss

    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        from .modeling_croco import patchify

        out = model(**batch)
        target = patchify(batch["pixel_values"], model.config.patch_size)
        return {"loss": per_pair_masked_loss(out.logits, target, out.mask, model.config.norm_pix_loss)}

    def compute_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"loss": outputs["loss"].mean().item()}


@dataclass
class CroCoDepthRecipe(CroCoRecipe):
    """The dense head: view 1's relative depth (standardised per image) from both views, MSE; metric: the MSE and
    the share of pixel pairs whose depth order the prediction gets right (ordinal accuracy on 1,024 random pairs
    per image)."""

    metric = "depth_mse"
    columns = ("image", "reference", "depth")

    def prepare_dataset(self, dataset, processor) -> TensorDataset:
        return TensorDataset(pixel_values=_pixels(processor, dataset["image"]),
                             reference_pixel_values=_pixels(processor, dataset["reference"]),
                             labels=torch.as_tensor(dataset.with_format("numpy")["depth"]))

    def compute_loss(self, model, batch, step_rng, state):
        return model(**batch).loss

    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        from .modeling_croco import standardize_depth

        predicted = model(pixel_values=batch["pixel_values"],
                          reference_pixel_values=batch["reference_pixel_values"]).predicted_depth.float()
        target = standardize_depth(batch["labels"].float())
        mse = (predicted - target).pow(2).flatten(1).mean(1)
        generator = torch.Generator().manual_seed(0)
        flat_p, flat_t = predicted.flatten(1), target.flatten(1)
        i, j = (torch.randint(flat_t.shape[1], (1024,), generator=generator) for _ in range(2))
        order = torch.sign(flat_t[:, i] - flat_t[:, j])
        agree = (torch.sign(flat_p[:, i] - flat_p[:, j]) == order).float()
        ordinal = (agree * (order != 0)).sum(1) / (order != 0).sum(1).clamp(min=1)
        return {"depth_mse": mse, "ordinal_accuracy": ordinal}

    def compute_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: values.mean().item() for name, values in outputs.items()}
