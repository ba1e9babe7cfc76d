"""Embedded image-text pairs: the procedural shapes of `images.py` in named colours, each with a caption ("a red
circle", "a photo of a red circle" or "a circle"), for pre-training a tiny CLIP from scratch and for zero-shot
classification of shapes or colours."""

from __future__ import annotations

import numpy as np

from .images import _SUPERSAMPLE, SHAPE_KINDS, _background, _draw_round, _outline

# Colour words and the RGB each is drawn in.
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 180), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
CAPTION_FORMS = ("a {colour} {shape}", "a photo of a {colour} {shape}", "a {shape}")


def captions_of(colour: str, shape: str) -> list[str]:
    """Every caption that is true of a `colour` `shape`."""
    return [form.format(colour=colour, shape=shape) for form in CAPTION_FORMS]


def caption_words() -> list[str]:
    """Every word a caption can hold (the vocabulary of a word tokenizer for them)."""
    return sorted({w for form in CAPTION_FORMS for w in form.split() if "{" not in w} | set(COLOURS) | set(SHAPE_KINDS))


def draw_captioned_shape(kind: str, colour: str, resolution: int, rng: np.random.Generator,
                         colour_jitter: float = 0.0):
    """One RGB image of `kind` in `colour` (each channel moved by up to +-`colour_jitter`) on a random background
    that stands out from it, and its caption."""
    from PIL import Image, ImageDraw

    side = resolution * _SUPERSAMPLE
    rgb = np.clip(np.array(COLOURS[colour]) + rng.uniform(-colour_jitter, colour_jitter, 3), 0, 255)
    for _ in range(20):  # a background far from the colour (the last one drawn if none is)
        canvas = _background(side, rng)
        if np.abs(rgb - np.asarray(canvas).reshape(-1, 3).mean(0)).sum() > 200:
            break
    fill = tuple(int(c) for c in rgb)
    radius = side * rng.uniform(0.2, 0.4)
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, side - margin, size=2)
    if kind in ("circle", "ring", "semicircle"):
        _draw_round(canvas, kind, cx, cy, radius, fill)
    else:
        ImageDraw.Draw(canvas).polygon(_outline(kind, cx, cy, radius), fill=fill)
    caption = CAPTION_FORMS[rng.integers(len(CAPTION_FORMS))].format(colour=colour, shape=kind)
    return canvas.resize((resolution, resolution), Image.LANCZOS), caption


def build_captioned_shapes(seed: int = 0, resolution: int = 32, num_train: int = 2000, num_test: int = 500,
                           label: str = "shape", colour_jitter: float = 0.0):
    """Columns "image" (RGB PIL), "label" (a `ClassLabel`: the shape, or with `label="colour"` the colour word),
    "caption", "shape" and "colour" (words). Labels cycle through their classes, so every split is balanced; the
    other attribute is drawn at random. `colour_jitter` moves each channel of the named colour by up to that much
    (a shift from the exact colours of the captions). Sample i of a split comes from its own generator seeded with
    (seed, split, i), so the set does not depend on its size."""
    import datasets

    from ..engine.loop import progress_bar

    if label not in ("shape", "colour"):
        raise ValueError(f"label must be 'shape' or 'colour', got {label!r}")
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
    if not 0 <= colour_jitter <= 255:
        raise ValueError(f"colour_jitter must be between 0 and 255, got {colour_jitter}")
    classes = list(SHAPE_KINDS) if label == "shape" else list(COLOURS)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes),
                                  "caption": datasets.Value("string"), "shape": datasets.Value("string"),
                                  "colour": datasets.Value("string")})
    splits = {}
    for split_id, (split, size) in enumerate((("train", num_train), ("test", num_test))):
        rows = {name: [] for name in features}
        for i in progress_bar(range(size), desc=f"building captioned_shapes ({split})"):
            rng = np.random.default_rng([seed, split_id, i])
            other = rng.integers(len(COLOURS) if label == "shape" else len(SHAPE_KINDS))
            shape, colour = ((SHAPE_KINDS[i % len(classes)], list(COLOURS)[other]) if label == "shape"
                             else (SHAPE_KINDS[other], list(COLOURS)[i % len(classes)]))
            image, caption = draw_captioned_shape(shape, colour, resolution, rng, colour_jitter)
            for name, value in (("image", image), ("label", i % len(classes)), ("caption", caption),
                                ("shape", shape), ("colour", colour)):
                rows[name].append(value)
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)
