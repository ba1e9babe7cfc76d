"""Embedded image-classification datasets: sklearn's bundled digits and procedural shapes."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPE_KINDS = (
    "circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "semicircle", "arrow",
)
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, so edges are anti-aliased at any resolution


def _features(names):
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})


def build_digits(seed: int = 0, test_size: float = 0.2):
    """sklearn's 1,797 8x8 handwritten digits as grey-scale PIL images; a stratified, seeded test split."""
    import datasets
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = [Image.fromarray((img * (255 / 16)).round().astype(np.uint8), mode="L") for img in digits.images]
    labels = digits.target.tolist()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels
    )
    features = _features([str(d) for d in range(10)])

    def subset(idx):
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in idx], "label": [labels[i] for i in idx]}, features=features
        )

    return datasets.DatasetDict(train=subset(train_idx), test=subset(test_idx))


def build_shapes(
    seed: int = 0,
    resolution: int = 32,
    num_classes: int = len(SHAPE_KINDS),
    num_train: int = 2000,
    num_test: int = 500,
):
    """Procedural shapes: the label is the shape kind; colour, size, position and background are random.

    Sample i of a split is drawn from its own generator seeded with (seed, split, i), so any sample can be
    rebuilt alone and the set does not depend on how many samples are asked for. Labels cycle through the
    classes, so every split is balanced.
    """
    import datasets

    from ..engine.loop import progress_bar

    if not 1 <= num_classes <= len(SHAPE_KINDS):
        raise ValueError(f"num_classes must be between 1 and {len(SHAPE_KINDS)}, got {num_classes}")
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
    kinds = SHAPE_KINDS[:num_classes]
    features = _features(kinds)
    splits = {}
    for split_id, (split, size) in enumerate((("train", num_train), ("test", num_test))):
        labels = [i % num_classes for i in range(size)]
        images = [
            draw_shape(kinds[label], resolution, np.random.default_rng([seed, split_id, i]))
            for i, label in enumerate(progress_bar(labels, desc=f"building shapes ({split})"))
        ]
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return datasets.DatasetDict(splits)


def draw_shape(kind: str, resolution: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of `kind` on a random background."""
    side = resolution * _SUPERSAMPLE
    canvas = _background(side, rng)
    colour = _contrasting_colour(np.asarray(canvas).reshape(-1, 3).mean(0), rng)
    radius = side * rng.uniform(0.2, 0.4)
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, side - margin, size=2)
    if kind in ("circle", "ring", "semicircle"):
        _draw_round(canvas, kind, cx, cy, radius, colour)
    else:
        ImageDraw.Draw(canvas).polygon(_outline(kind, cx, cy, radius), fill=colour)
    return canvas.resize((resolution, resolution), Image.LANCZOS)


def _background(side: int, rng: np.random.Generator) -> Image.Image:
    style = rng.integers(3)
    if style == 0:  # solid
        pixels = np.broadcast_to(rng.uniform(0, 255, 3), (side, side, 3))
    elif style == 1:  # linear gradient between two colours, random direction
        a, b = rng.uniform(0, 255, (2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:side, 0:side] / side
        t = (np.cos(angle) * xs + np.sin(angle) * ys)
        t = (t - t.min()) / (t.max() - t.min())
        pixels = a + (b - a) * t[..., None]
    else:  # smooth noise: a coarse random grid upsampled
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        return Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
    return Image.fromarray(np.ascontiguousarray(pixels).astype(np.uint8))


def _contrasting_colour(background: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - background).sum() > 200:
            break
    else:  # a mid-grey background admits no far colour: take the far corner of the RGB cube
        colour = np.where(background > 127, 0.0, 255.0)
    return tuple(int(c) for c in colour)


def _regular(cx, cy, r, n, phase=-math.pi / 2, inner=None):
    """Vertices of a regular n-gon (or an n-pointed star when `inner` radius is given)."""
    points = []
    steps = 2 * n if inner else n
    for k in range(steps):
        rad = (inner if inner and k % 2 else r)
        a = phase + 2 * math.pi * k / steps
        points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return points


def _outline(kind, cx, cy, r):
    if kind == "square":
        s = r * 0.8
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return _regular(cx, cy, r, 3)
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if kind == "cross":
        w = r * 0.3
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if kind == "star":
        return _regular(cx, cy, r, 5, inner=r * 0.4)
    if kind == "hexagon":
        return _regular(cx, cy, r, 6, phase=0)
    if kind == "arrow":
        w = r * 0.25
        return [(cx - r, cy - w), (cx, cy - w), (cx, cy - r * 0.7), (cx + r, cy), (cx, cy + r * 0.7),
                (cx, cy + w), (cx - r, cy + w)]
    raise ValueError(f"unknown shape kind {kind!r}; known: {SHAPE_KINDS}")


def _draw_round(canvas, kind, cx, cy, r, colour):
    draw = ImageDraw.Draw(canvas)
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(1, int(r * 0.3)))
    else:  # semicircle, flat side down
        draw.pieslice(box, 180, 360, fill=colour)
