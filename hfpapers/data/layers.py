"""Embedded transparent layers: procedural RGBA images for latent-transparency models (LayerDiffuse).

Each layer stacks one to three shapes, each opaque or semi-transparent, with a hard (anti-aliased) or soft
(blurred) edge, filled with a flat colour, a gradient or smooth noise. The colour of invisible pixels is a
different random background, as in layers cut out of photographs: a model must read alpha, never guess it
from the colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .images import _SUPERSAMPLE, SHAPE_KINDS, _background, _draw_round, _outline


def build_rgba_layers(seed: int = 0, resolution: int = 64, num_train: int = 1024, num_test: int = 128):
    """A `DatasetDict` with one column, "image": RGBA PIL images of `resolution` pixels square.

    Sample i of a split comes from its own generator seeded with (seed, split, i), so the set is the same
    whatever its size.
    """
    import datasets

    from ..engine.loop import progress_bar

    if resolution < 16:
        raise ValueError(f"resolution must be at least 16 pixels, got {resolution}")
    features = datasets.Features({"image": datasets.Image()})
    splits = {}
    for split_id, (split, size) in enumerate((("train", num_train), ("test", num_test))):
        images = [draw_layer(resolution, np.random.default_rng([seed, split_id, i]))
                  for i in progress_bar(range(size), desc=f"building rgba_layers ({split})")]
        splits[split] = datasets.Dataset.from_dict({"image": images}, features=features)
    return datasets.DatasetDict(splits)


def draw_layer(resolution: int, rng: np.random.Generator) -> Image.Image:
    """One RGBA layer: shapes composited with the "over" operator in premultiplied colour."""
    premultiplied = np.zeros((resolution, resolution, 3))
    alpha = np.zeros((resolution, resolution, 1))
    for _ in range(rng.integers(1, 4)):
        coverage = _shape_mask(resolution, rng) * (1.0 if rng.random() < 0.6 else rng.uniform(0.25, 0.75))
        fill = np.asarray(_background(resolution, rng), dtype=np.float64) / 255
        premultiplied = fill * coverage + premultiplied * (1 - coverage)
        alpha = coverage + alpha * (1 - coverage)
    hidden = np.asarray(_background(resolution, rng), dtype=np.float64) / 255  # colour where nothing shows
    colour = np.where(alpha > 0, premultiplied / np.maximum(alpha, 1e-8), hidden)
    rgba = np.concatenate([colour, alpha], axis=-1)
    return Image.fromarray((rgba * 255).round().clip(0, 255).astype(np.uint8), mode="RGBA")


def _shape_mask(resolution: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 1) coverage in [0, 1] of one shape: anti-aliased, then blurred for a soft edge half the time."""
    side = resolution * _SUPERSAMPLE
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    radius = side * rng.uniform(0.12, 0.35)
    cx, cy = rng.uniform(radius * 0.5, side - radius * 0.5, size=2)
    canvas = Image.new("RGB", (side, side))
    if kind in ("circle", "ring", "semicircle"):
        _draw_round(canvas, kind, cx, cy, radius, (255, 255, 255))
    else:
        ImageDraw.Draw(canvas).polygon(_outline(kind, cx, cy, radius), fill=(255, 255, 255))
    mask = canvas.convert("L").resize((resolution, resolution), Image.BOX)
    if rng.random() < 0.5:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, resolution / 16)))
    return np.asarray(mask, dtype=np.float64)[..., None] / 255
