"""`pipeline("reasoning-segmentation", model=...)`: (image, question) -> mask, answer text, SasP points, similarity map.

The answer is generated greedily; the mask is read off its first `[SEG]`. An answer without `[SEG]` gives an empty
mask and `"segmented": False` (the model said there is nothing to segment), never an error.
"""

from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.utils import logging

logger = logging.get_logger(__name__)


class ReasoningSegmentationPipeline(Pipeline):
    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, max_new_tokens=None, **kwargs):
        if kwargs:
            raise TypeError(f"reasoning-segmentation takes max_new_tokens only, got {sorted(kwargs)}")
        return {}, ({"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}), {}

    def __call__(self, image, question: str | None = None, **kwargs: Any):
        """`image`: PIL image, path or URL (any size, grayscale or colour); `question`: what to segment. A list of
        {"image": ..., "question": ...} dicts runs them one by one."""
        if question is None:
            return super().__call__(image, **kwargs)
        return super().__call__({"image": image, "question": question}, **kwargs)

    def preprocess(self, inputs: dict):
        if not isinstance(inputs, dict) or not isinstance(inputs.get("question"), str):
            raise TypeError("reasoning-segmentation takes an image and a question string: seg(image, question)")
        image = load_image(inputs["image"])
        encoded = self.processor(images=[image], text=[self.processor.prompt(inputs["question"])])
        encoded["image"] = image
        return encoded

    def _forward(self, model_inputs, max_new_tokens: int = 32):
        image = model_inputs.pop("image")
        prompt_length = model_inputs["input_ids"].shape[1]
        return {"image": image, "prompt_length": prompt_length,
                **self.model.segment(**model_inputs, max_new_tokens=max_new_tokens)}

    def postprocess(self, outputs):
        tokenizer = self.processor.tokenizer
        answer = outputs["sequences"][0, outputs["prompt_length"]:].tolist()
        if tokenizer.eos_token_id in answer:
            answer = answer[: answer.index(tokenizer.eos_token_id)]
        text = tokenizer.decode([t for t in answer if t != tokenizer.pad_token_id]).strip()
        width, height = outputs["image"].size
        mask, points, labels, similarity = (outputs[k][0] for k in ("pred_masks", "points", "point_labels",
                                                                     "similarity_maps"))
        if mask is None:
            logger.warning("the answer %r has no [SEG] token: nothing was segmented, the mask is empty", text)
            return {"mask": np.zeros((height, width), dtype=bool), "text": text, "points": [], "point_labels": [],
                    "similarity_map": None, "segmented": False}
        return {"mask": (mask > 0).cpu().numpy(), "text": text, "points": points.cpu().tolist(),
                "point_labels": labels.cpu().tolist(), "similarity_map": similarity.float().cpu().numpy(),
                "segmented": True}


def save_overlay(image: Image.Image, result: dict, path: str) -> Image.Image:
    """Side by side: the image with the mask tinted and the SasP points (green positive, red negative, grey
    neutral), and the similarity map as a heat map over the image. Saved to `path` (PNG) and returned."""
    image = image.convert("RGB")
    mask = np.asarray(result["mask"], dtype=bool)
    pixels = np.asarray(image, dtype=np.float32)
    tinted = np.where(mask[..., None], 0.5 * pixels + 0.5 * np.array([0, 120, 255]), pixels)
    left = Image.fromarray(tinted.astype(np.uint8))
    draw = ImageDraw.Draw(left)
    radius = max(2, min(image.size) // 64)
    colours = {1: (0, 220, 0), 0: (230, 0, 0), -1: (160, 160, 160)}
    for (x, y), label in zip(result["points"], result["point_labels"]):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colours[label], outline=(255, 255, 255))
    similarity = result["similarity_map"]
    heat = np.zeros(mask.shape) if similarity is None else np.clip(np.asarray(similarity), 0, 1)
    # A blue -> red ramp, blended 60/40 over the image.
    ramp = np.stack([255 * heat, 255 * (1 - np.abs(2 * heat - 1)), 255 * (1 - heat)], axis=-1)
    right = Image.fromarray((0.4 * pixels + 0.6 * ramp).astype(np.uint8))
    canvas = Image.new("RGB", (2 * image.width, image.height))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (image.width, 0))
    canvas.save(path, format="PNG")
    return canvas


__all__ = ["ReasoningSegmentationPipeline", "save_overlay"]
