"""Embedded transparent layers: procedural RGBA images for latent-transparency models (LayerDiffuse).

Each layer stacks one to three shapes, each opaque or semi-transparent, with a hard (anti-aliased) or soft
(blurred) edge, filled with a flat colour, a gradient or smooth noise. The colour of invisible pixels is a
different random background, as in layers cut out of photographs: a model must read alpha, never guess it
from the colour. Each layer's caption names its shapes, bottom first, with the colour word nearest to each fill's
mean colour ("red circle and blue star"): what a text-to-image model is fine-tuned on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .images import _SUPERSAMPLE, SHAPE_KINDS, _background, _draw_round, _outline


def build_rgba_layers(seed: int = 0, resolution: int = 64, num_train: int = 1024, num_test: int = 128):
    """A `DatasetDict` with columns "image" (RGBA PIL images of `resolution` pixels square) and "text" (captions).

    Sample i of a split comes from its own generator seeded with (seed, split, i), so the set is the same
    whatever its size.
    """
    import datasets

    from ..engine.loop import progress_bar

    if resolution < 16:
        raise ValueError(f"resolution must be at least 16 pixels, got {resolution}")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    splits = {}
    for split_id, (split, size) in enumerate((("train", num_train), ("test", num_test))):
        layers = [draw_layer(resolution, np.random.default_rng([seed, split_id, i]))
                  for i in progress_bar(range(size), desc=f"building rgba_layers ({split})")]
        splits[split] = datasets.Dataset.from_dict({"image": [image for image, _ in layers],
                                                    "text": [caption for _, caption in layers]}, features=features)
    return datasets.DatasetDict(splits)


# The captions' colour words and the RGB (in [0, 1]) each stands for: a fill is named by the nearest one.
COLOUR_WORDS = {"red": (0.86, 0.16, 0.16), "orange": (0.94, 0.55, 0.12), "yellow": (0.92, 0.86, 0.2),
                "green": (0.2, 0.67, 0.24), "cyan": (0.2, 0.78, 0.82), "blue": (0.16, 0.27, 0.82),
                "purple": (0.55, 0.24, 0.75), "pink": (0.94, 0.51, 0.75), "white": (0.94, 0.94, 0.94),
                "grey": (0.5, 0.5, 0.5), "black": (0.08, 0.08, 0.08), "brown": (0.51, 0.31, 0.16)}


def colour_word(rgb) -> str:
    """The caption word for an RGB colour in [0, 1]: the nearest of `COLOUR_WORDS`."""
    distances = np.linalg.norm(np.asarray(list(COLOUR_WORDS.values())) - np.asarray(rgb), axis=1)
    return list(COLOUR_WORDS)[int(distances.argmin())]


def draw_layer(resolution: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One RGBA layer, its shapes composited with the "over" operator in premultiplied colour, and its caption."""
    premultiplied = np.zeros((resolution, resolution, 3))
    alpha = np.zeros((resolution, resolution, 1))
    words = []
    for _ in range(rng.integers(1, 4)):
        kind, mask = _shape_mask(resolution, rng)
        coverage = mask * (1.0 if rng.random() < 0.6 else rng.uniform(0.25, 0.75))
        fill = np.asarray(_background(resolution, rng), dtype=np.float64) / 255
        premultiplied = fill * coverage + premultiplied * (1 - coverage)
        alpha = coverage + alpha * (1 - coverage)
        words.append(f"{colour_word((fill * mask).sum((0, 1)) / max(mask.sum(), 1e-8))} {kind}")
    hidden = np.asarray(_background(resolution, rng), dtype=np.float64) / 255  # colour where nothing shows
    colour = np.where(alpha > 0, premultiplied / np.maximum(alpha, 1e-8), hidden)
    rgba = np.concatenate([colour, alpha], axis=-1)
    return Image.fromarray((rgba * 255).round().clip(0, 255).astype(np.uint8), mode="RGBA"), " and ".join(words)


def shape_coverage(kind: str, resolution: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """(H, W) coverage in [0, 1] of one hard-edged `kind` at centre (cx, cy) with `radius`, in pixels of the
    `resolution`-pixel layer: drawn at 4x and box-downsampled, as every shape of the layers is."""
    side = resolution * _SUPERSAMPLE
    canvas = Image.new("L", (side, side))
    cx, cy, radius = cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, radius * _SUPERSAMPLE
    if kind in ("circle", "ring", "semicircle"):
        _draw_round(canvas, kind, cx, cy, radius, 255)
    else:
        ImageDraw.Draw(canvas).polygon(_outline(kind, cx, cy, radius), fill=255)
    return np.asarray(canvas.resize((resolution, resolution), Image.BOX), dtype=np.float64) / 255


def _shape_mask(resolution: int, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """One random shape's kind and (H, W, 1) coverage in [0, 1]: anti-aliased, then blurred for a soft edge half
    the time."""
    side = resolution * _SUPERSAMPLE
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    radius = side * rng.uniform(0.12, 0.35)
    cx, cy = rng.uniform(radius * 0.5, side - radius * 0.5, size=2)
    coverage = shape_coverage(kind, resolution, *(x / _SUPERSAMPLE for x in (cx, cy, radius)))
    mask = Image.fromarray((coverage * 255).round().astype(np.uint8))
    if rng.random() < 0.5:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, resolution / 16)))
    return kind, np.asarray(mask, dtype=np.float64)[..., None] / 255
