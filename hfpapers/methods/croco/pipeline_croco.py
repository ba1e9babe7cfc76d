"""`pipeline("cross-view-completion", model=...)`: (image, reference) -> view 1 with most patches masked, and its
reconstruction from the visible patches and the reference view.

With `norm_pix_loss` the model predicts each patch standardised by its own mean and variance; to show it, the
prediction is put back at the true patch's mean and spread, as the official demo does (so the colours of masked
patches are borrowed from the image, their structure is the model's).
"""

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .modeling_croco import patchify, random_mask, unpatchify


class CrossViewCompletionPipeline(Pipeline):
    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, mask_seed=None, mask=None, **kwargs):
        if kwargs:
            raise TypeError(f"cross-view-completion takes mask_seed and mask only, got {sorted(kwargs)}")
        forward = {}
        if mask_seed is not None:
            forward["mask_seed"] = mask_seed
        if mask is not None:
            forward["mask"] = mask
        return {}, forward, {}

    def __call__(self, image, reference=None, **kwargs: Any):
        """`image`: the view to mask and complete, `reference`: another view of the scene (PIL images, paths or
        URLs; both are resized to the model's size). `mask_seed` draws the mask (default: the model's
        `eval_mask_seed`); `mask` (patches,) bool gives it. A list of {"image", "reference"} dicts runs them one
        by one."""
        if reference is None:
            return super().__call__(image, **kwargs)
        return super().__call__({"image": image, "reference": reference}, **kwargs)

    def preprocess(self, inputs: dict):
        if not isinstance(inputs, dict) or inputs.get("reference") is None:
            raise TypeError("cross-view-completion takes two views of one scene: complete(image, reference)")
        views = [load_image(inputs[name]).convert("RGB") for name in ("image", "reference")]
        pixels = self.image_processor(views, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels[:1], "reference_pixel_values": pixels[1:]}

    def _forward(self, model_inputs, mask_seed: int | None = None, mask=None):
        config = self.model.config
        pixels = model_inputs["pixel_values"]
        patches = (pixels.shape[2] // config.patch_size) * (pixels.shape[3] // config.patch_size)
        if mask is None:
            seed = config.eval_mask_seed if mask_seed is None else mask_seed
            mask = random_mask(1, patches, int(config.mask_ratio * patches), torch.Generator().manual_seed(seed))
        else:
            mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool).reshape(1, -1)
        out = self.model(**model_inputs, mask=mask.to(pixels.device))
        return {"logits": out.logits, "mask": out.mask, "loss": out.loss, **model_inputs}

    def postprocess(self, outputs):
        config = self.model.config
        p = config.patch_size
        pixels, reference = outputs["pixel_values"].float(), outputs["reference_pixel_values"].float()
        target = patchify(pixels, p)
        predicted = outputs["logits"].float()
        if config.norm_pix_loss:
            predicted = predicted * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        mask = outputs["mask"][..., None]
        height, width = pixels.shape[2:]
        mean, std = (torch.tensor(v, dtype=torch.float32) for v in (self.image_processor.image_mean,
                                                                    self.image_processor.image_std))
        grey = ((0.5 - mean) / std).repeat(p * p)  # a mid-grey patch, in the (row, column, channel) layout
        reconstruction = unpatchify(torch.where(mask, predicted, target), p, height, width)
        masked = unpatchify(torch.where(mask, grey, target), p, height, width)
        mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        return {"reconstruction": _to_image(reconstruction, mean, std),
                "masked_image": _to_image(masked, mean, std),
                "reference": _to_image(reference, mean, std),
                "mask": outputs["mask"][0].view(height // p, width // p).cpu().numpy(),
                "loss": outputs["loss"].item()}


def _to_image(normalised: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> Image.Image:
    rgb = (normalised.cpu() * std + mean).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def save_completion(result: dict, path: str) -> Image.Image:
    """Masked view | reference | reconstruction, side by side, saved to `path` (PNG) and returned."""
    panels = [result["masked_image"], result["reference"], result["reconstruction"]]
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width
    canvas.save(path, format="PNG")
    return canvas


__all__ = ["CrossViewCompletionPipeline", "save_completion"]
