"""Embedded reasoning-segmentation scenes: images of a few coloured shapes, a question that refers to exactly
one of them, an answer with one "[SEG]" token and the mask of the referred shape (LISA / READ style).

Every scene holds 2 to 4 non-overlapping shapes (circle, square, triangle, diamond, star) in one of five
colours (red, green, blue, yellow, purple) and two sizes: a large shape has three times the area of a small one
whatever its kind, so "largest" and "smallest" are read from the picture. The background is a light neutral
colour, plain, with a gentle gradient or with faint noise. Questions come in families of increasing reasoning:

- attribute: "segment the red circle .", "where is the small blue shape ?"
- superlative: "can you segment the largest green object in this image ?", "segment the smallest shape ."
- extreme position: "please segment the leftmost circle ."
- spatial relation: "where is the shape to the left of the triangle ?", "segment the object above the red square ."
- closest: "which shape is closest to the yellow star ?"
- same colour / same shape: "which shape has the same colour as the circle ?",
  "which object has the same shape as the large blue object ?"
- odd colour: "which shape has a different colour from the others ?"

A question is drawn, then checked against the scene's ground truth: exactly one shape must satisfy it, with a
clear margin for positions and sizes (otherwise the scene or the question is drawn again). Text is lowercase and
split by single spaces, punctuation included, so `vocabulary()` lists every word a question or answer can hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .images import _SUPERSAMPLE, _outline

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (235, 200, 30),
    "purple": (140, 50, 180),
}
KINDS = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "large")
NOUNS = ("shape", "object")
SUPERLATIVES = ("largest", "smallest")
EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("to the left of", "to the right of", "above", "below")
FAMILIES: dict[str, float] = {  # question family -> how often it is drawn
    "attribute": 0.25, "superlative": 0.15, "extreme": 0.15, "relation": 0.2, "closest": 0.07,
    "same_colour": 0.07, "same_shape": 0.06, "odd_colour": 0.05,
}
REFERRING_TEMPLATES = (
    "segment the {} .", "please segment the {} .", "can you segment the {} in this image ?", "where is the {} ?",
    "what is the {} in this image ? please output segmentation mask .",
)
WHICH_TEMPLATES = {
    "closest": "which {} is closest to the {} ?",
    "same_colour": "which {} has the same colour as the {} ?",
    "same_shape": "which {} has the same shape as the {} ?",
    "odd_colour": "which {} has a different colour from the others ?",
}
WHICH_SUFFIX = " please output segmentation mask ."
ANSWERS = ("it is [SEG] .", "sure , [SEG] .", "sure , it is [SEG] .", "sure , the segmentation result is [SEG] .",
           "[SEG] .")
SEG_TOKEN = "[SEG]"

MIN_IMAGE_SIZE = 32
# Radius of the circle with a shape's area, as a fraction of the image's shorter side: 3x the area when large.
_EQUIVALENT_RADIUS = {"small": 0.1, "large": 0.1 * math.sqrt(3)}
_AREA_PER_RADIUS2 = {  # area of the outline drawn with radius r, divided by r^2
    "circle": math.pi, "square": 1.6 ** 2, "triangle": 3 * math.sqrt(3) / 4, "diamond": 1.4,
    "star": 5 * 0.4 * math.sin(math.pi / 5),
}
_BOUND_PER_RADIUS = {"circle": 1.0, "square": 0.8 * math.sqrt(2), "triangle": 1.0, "diamond": 1.0, "star": 1.0}
_MARGIN = 0.1      # a position-based answer wins by at least this fraction of the image side
_CLOSEST_RATIO = 0.7  # the closest shape is at most this fraction of the second closest's distance
_NEED_THREE = ("closest", "odd_colour")  # families that need a scene of 3 shapes or more


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    size: str
    x: float  # centre, in pixels (pixel j covers [j, j + 1))
    y: float
    radius: float  # of the outline passed to the drawing helpers
    bound: float  # of the enclosing circle


def build_referring_scenes(
    seed: int = 0,
    num_train: int = 1024,
    num_test: int = 128,
    image_size: int | Sequence[int] = 64,
    min_objects: int = 2,
    max_objects: int = 4,
    families: Sequence[str] | None = None,
):
    """A `DatasetDict` ("train", "test") of referring scenes with columns "image" (RGB PIL), "question" (str),
    "answer" (str, with exactly one "[SEG]") and "mask" (mode "L" PIL, 255 on the referred shape, else 0).

    `image_size` is a side (square scenes) or (height, width), at least 32 pixels. Each scene has between
    `min_objects` and `max_objects` shapes (2 to 4). `families` restricts the questions to some of `FAMILIES`
    (by default all those the scenes allow: "closest" and "odd_colour" need 3 shapes), drawn with the weights
    there. The mask is pixel-exact: the pixels that the referred shape covers at 50% or more (coverage measured
    on a 4x supersampled grid, as the image is anti-aliased). Shape kinds are easiest to tell apart in small
    shapes from 64 pixels on.
    Sample i of a split comes from its own generator seeded with (seed, split, i), so the set is the same
    whatever its size.
    """
    import datasets

    from ..engine.loop import progress_bar

    height, width = _image_size(image_size)
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not 2 <= min_objects <= max_objects <= 4:
        raise ValueError(f"need 2 <= min_objects <= max_objects <= 4, got min_objects={min_objects}, "
                         f"max_objects={max_objects}")
    families = _families(families, max_objects)
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "mask": datasets.Image()})
    splits = {}
    for split_id, (split, size) in enumerate((("train", num_train), ("test", num_test))):
        rows = [draw_scene(height, width, np.random.default_rng([seed, split_id, i]), min_objects, max_objects,
                           families) for i in progress_bar(range(size), desc=f"building referring_scenes ({split})")]
        columns = {key: [row[key] for row in rows] for key in ("image", "question", "answer", "mask")}
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def vocabulary() -> list[str]:
    """Every word (space-separated, punctuation included) that a question or an answer can contain, sorted."""
    templates = [*REFERRING_TEMPLATES, *WHICH_TEMPLATES.values(), WHICH_SUFFIX, *ANSWERS, *RELATIONS]
    words = {w for t in templates for w in re.sub(r"\{\}", " ", t).split()}
    words.update([*COLOURS, *KINDS, *SIZES, *NOUNS, *SUPERLATIVES, *EXTREMES])
    return sorted(words)


def draw_scene(height: int, width: int, rng: np.random.Generator, min_objects: int = 2, max_objects: int = 4,
               families: Sequence[str] | None = None) -> dict:
    """One sample: {"image", "question", "answer", "mask"}; the question family is drawn first, then scenes
    until one admits an unambiguous question of that family."""
    families = _families(families, max_objects)
    weights = np.array([FAMILIES[f] for f in families])
    family = families[rng.choice(len(families), p=weights / weights.sum())]
    for _ in range(1000):
        shapes = _sample_shapes(height, width, rng, min_objects, max_objects)
        asked = _QUESTIONS[family](shapes, rng, height, width)
        if asked is not None:
            break
    else:  # pragma: no cover - every family is instantiable in a few scenes
        raise RuntimeError(f"could not draw a {family!r} question in 1000 scenes")
    question, target = asked
    answer = ANSWERS[rng.integers(len(ANSWERS))]
    image, masks = _render(shapes, height, width, rng)
    mask = Image.fromarray((masks[target] * 255).astype(np.uint8), mode="L")
    return {"image": image, "question": question, "answer": answer, "mask": mask}


# ------------------------------------------------------------------ scenes


def _families(families, max_objects) -> list[str]:
    if families is None:  # all that the scenes allow
        return [f for f in FAMILIES if max_objects >= 3 or f not in _NEED_THREE]
    families = list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {list(FAMILIES)}, got {families}")
    if max_objects < 3 and set(families) & set(_NEED_THREE):
        raise ValueError(f"{sorted(set(families) & set(_NEED_THREE))} questions need max_objects >= 3")
    return families


def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, (bool, str, bytes)):
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    if isinstance(image_size, (int, np.integer)):
        height = width = int(image_size)
    else:
        try:
            height, width = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if min(height, width) < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels on each side, got "
                         f"{height}x{width} (height x width)")
    return height, width


def _sample_shapes(height, width, rng, min_objects, max_objects) -> list[_Shape]:
    """2-4 shapes at random positions, their enclosing circles apart by a gap and inside the image."""
    side = min(height, width)
    gap = max(2.0, 0.04 * side)
    for _ in range(100):
        shapes: list[_Shape] = []
        for _ in range(rng.integers(min_objects, max_objects + 1)):
            kind = KINDS[rng.integers(len(KINDS))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            size = SIZES[rng.integers(len(SIZES))]
            radius = _EQUIVALENT_RADIUS[size] * side * math.sqrt(math.pi / _AREA_PER_RADIUS2[kind])
            bound = radius * _BOUND_PER_RADIUS[kind]
            for _ in range(50):
                x = rng.uniform(bound + 1, width - bound - 1)
                y = rng.uniform(bound + 1, height - bound - 1)
                if all(math.hypot(x - s.x, y - s.y) >= bound + s.bound + gap for s in shapes):
                    shapes.append(_Shape(kind, colour, size, x, y, radius, bound))
                    break
            else:
                break  # no room: draw the scene again
        else:
            return shapes
    raise RuntimeError(f"could not place {max_objects} shapes in {height}x{width} pixels")  # pragma: no cover


def _render(shapes, height, width, rng) -> tuple[Image.Image, list[np.ndarray]]:
    """The anti-aliased RGB image and, per shape, its mask (coverage >= 1/2 on a 4x supersampled grid)."""
    pixels = _light_background(height, width, rng)
    s = _SUPERSAMPLE
    masks = []
    for shape in shapes:
        # Drawn in a window around the shape only; the shape lies inside the image, so the window does too.
        left, top = int(shape.x - shape.bound) - 1, int(shape.y - shape.bound) - 1
        right, bottom = int(math.ceil(shape.x + shape.bound)) + 1, int(math.ceil(shape.y + shape.bound)) + 1
        left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
        canvas = Image.new("L", ((right - left) * s, (bottom - top) * s), 0)
        x, y, r = (shape.x - left) * s, (shape.y - top) * s, shape.radius * s
        if shape.kind == "circle":
            ImageDraw.Draw(canvas).ellipse((x - r, y - r, x + r, y + r), fill=255)
        else:
            ImageDraw.Draw(canvas).polygon(_outline(shape.kind, x, y, r), fill=255)
        window = (np.asarray(canvas, dtype=np.float64) / 255).reshape(bottom - top, s, right - left, s)
        coverage = np.zeros((height, width))
        coverage[top:bottom, left:right] = window.mean(axis=(1, 3))
        pixels = pixels * (1 - coverage[..., None]) + np.array(COLOURS[shape.colour]) * coverage[..., None]
        masks.append(coverage >= 0.5)
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), mode="RGB"), masks


def _light_background(height, width, rng) -> np.ndarray:
    """(H, W, 3) floats: a light, nearly neutral colour, plain, with a gentle gradient or with faint noise."""
    base = rng.uniform(185, 240) + rng.uniform(-8, 8, 3)
    style = rng.integers(3)
    if style == 0:
        return np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    if style == 1:
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = np.cos(angle) * xs / width + np.sin(angle) * ys / height
        t = (t - t.min()) / max(t.max() - t.min(), 1e-8) - 0.5
        return base + rng.uniform(10, 24) * t[..., None]
    return base + rng.uniform(-5, 5, (height, width, 1)) + rng.uniform(-2, 2, (height, width, 3))


# ------------------------------------------------------------------ questions


_ATTRIBUTE_FORMS = (("colour", "kind"), ("kind",), ("colour",), ("size", "kind"), ("size", "colour", "kind"),
                    ("size", "colour"), ("size",))
_FILTER_FORMS = ((), ("colour",), ("kind",))  # which shapes a superlative / relation / "which" ranges over


def _matches(shape: _Shape, reference: _Shape, keys) -> bool:
    return all(getattr(shape, key) == getattr(reference, key) for key in keys)


def _name(shape: _Shape, keys, rng) -> str:
    """Words naming `shape` by some of its attributes: size, colour, then its kind or a generic noun."""
    words = [getattr(shape, key) for key in ("size", "colour") if key in keys]
    return " ".join(words + [shape.kind if "kind" in keys else NOUNS[rng.integers(len(NOUNS))]])


def _unique_name(shapes, index, forms, rng) -> str | None:
    """A description among `forms` that fits shapes[index] only (forms tried in random order), or None."""
    for f in rng.permutation(len(forms)):
        keys = forms[f]
        if sum(_matches(s, shapes[index], keys) for s in shapes) == 1:
            return _name(shapes[index], keys, rng)
    return None


def _refer(expression: str, rng) -> str:
    return REFERRING_TEMPLATES[rng.integers(len(REFERRING_TEMPLATES))].format(expression)


def _which(family: str, rng, *parts) -> str:
    question = WHICH_TEMPLATES[family].format(*parts)
    return question + (WHICH_SUFFIX if rng.random() < 0.3 else "")


def _attribute(shapes, rng, height, width):
    target = int(rng.integers(len(shapes)))
    name = _unique_name(shapes, target, _ATTRIBUTE_FORMS, rng)
    return None if name is None else (_refer(name, rng), target)


def _filters(shapes, reference, rng, exclude=()):
    """(filter keys, indices of the shapes of `shapes` that share them with `reference`) in random order."""
    for f in rng.permutation(len(_FILTER_FORMS)):
        keys = _FILTER_FORMS[f]
        yield keys, [i for i, s in enumerate(shapes) if i not in exclude and _matches(s, reference, keys)]


def _superlative(shapes, rng, height, width):
    target = int(rng.integers(len(shapes)))
    word = "largest" if shapes[target].size == "large" else "smallest"
    for keys, candidates in _filters(shapes, shapes[target], rng):
        others = [i for i in candidates if i != target]
        if others and all(shapes[i].size != shapes[target].size for i in others):
            return _refer(f"{word} {_name(shapes[target], keys, rng)}", rng), target
    return None


def _coordinate(shape, direction):
    """Signed position along a direction: larger is further that way."""
    return {"left": -shape.x, "right": shape.x, "top": -shape.y, "bottom": shape.y}[direction]


def _extreme(shapes, rng, height, width):
    target = int(rng.integers(len(shapes)))
    for e in rng.permutation(len(EXTREMES)):
        word = EXTREMES[e]
        direction = word[: -len("most")]
        margin = _MARGIN * (width if direction in ("left", "right") else height)
        for keys, candidates in _filters(shapes, shapes[target], rng):
            others = [i for i in candidates if i != target]
            lead = _coordinate(shapes[target], direction)
            if others and all(lead - _coordinate(shapes[i], direction) >= margin for i in others):
                return _refer(f"{word} {_name(shapes[target], keys, rng)}", rng), target
    return None


_RELATION_DIRECTION = {"to the left of": "left", "to the right of": "right", "above": "top", "below": "bottom"}


def _related(shape, anchor, direction, height, width) -> bool | None:
    """True when `shape` is clearly `direction` of `anchor` (by a margin, and more that way than across),
    False when it is on the other side, None in between (which makes a question ambiguous)."""
    along = _coordinate(shape, direction) - _coordinate(anchor, direction)
    horizontal = direction in ("left", "right")
    across = abs(shape.y - anchor.y) if horizontal else abs(shape.x - anchor.x)
    if along >= max(_MARGIN * (width if horizontal else height), across / 2):
        return True
    return False if along <= -1.0 else None


def _relation(shapes, rng, height, width):
    anchor = int(rng.integers(len(shapes)))
    anchor_name = _unique_name(shapes, anchor, _ATTRIBUTE_FORMS, rng)
    if anchor_name is None:
        return None
    for r in rng.permutation(len(RELATIONS)):
        direction = _RELATION_DIRECTION[RELATIONS[r]]
        related = [_related(s, shapes[anchor], direction, height, width) for s in shapes]
        for target in rng.permutation(len(shapes)):
            if target == anchor or not related[target]:
                continue
            for keys, candidates in _filters(shapes, shapes[target], rng, exclude=(anchor,)):
                if all(related[i] is False for i in candidates if i != target):
                    expression = f"{_name(shapes[target], keys, rng)} {RELATIONS[r]} the {anchor_name}"
                    return _refer(expression, rng), int(target)
    return None


def _closest(shapes, rng, height, width):
    anchor = int(rng.integers(len(shapes)))
    anchor_name = _unique_name(shapes, anchor, _ATTRIBUTE_FORMS, rng)
    if anchor_name is None:
        return None
    a = shapes[anchor]
    distance = [math.hypot(s.x - a.x, s.y - a.y) for s in shapes]
    for target in rng.permutation(len(shapes)):
        if target == anchor:
            continue
        for keys, candidates in _filters(shapes, shapes[target], rng, exclude=(anchor,)):
            others = [distance[i] for i in candidates if i != target]
            if others and distance[target] <= _CLOSEST_RATIO * min(others):
                return _which("closest", rng, _name(shapes[target], keys, rng), anchor_name), int(target)
    return None


def _same(attribute):
    family = "same_colour" if attribute == "colour" else "same_shape"
    # The anchor is named without the attribute asked about, else the question gives the answer away.
    forms = tuple(f for f in _ATTRIBUTE_FORMS if attribute not in f)

    def ask(shapes, rng, height, width):
        anchor = int(rng.integers(len(shapes)))
        anchor_name = _unique_name(shapes, anchor, forms, rng)
        hits = [i for i, s in enumerate(shapes)
                if i != anchor and getattr(s, attribute) == getattr(shapes[anchor], attribute)]
        if anchor_name is None or len(hits) != 1:
            return None
        return _which(family, rng, NOUNS[rng.integers(len(NOUNS))], anchor_name), hits[0]

    return ask


def _odd_colour(shapes, rng, height, width):
    if len(shapes) < 3:
        return None
    colours = [s.colour for s in shapes]
    odd = [i for i, c in enumerate(colours) if colours.count(c) == 1]
    if len(odd) != 1 or len(set(colours)) != 2:
        return None
    return _which("odd_colour", rng, NOUNS[rng.integers(len(NOUNS))]), odd[0]


_QUESTIONS = {"attribute": _attribute, "superlative": _superlative, "extreme": _extreme, "relation": _relation,
              "closest": _closest, "same_colour": _same("colour"), "same_shape": _same("kind"),
              "odd_colour": _odd_colour}
