"""Referring scenes (READ / LISA style): deterministic, one [SEG] per answer, a closed vocabulary, and each mask
is the shape its question refers to, checked by a solver that reads the question and the image on its own
(colour segmentation, shape kind from fill ratio and aspect) without the generator's ground truth."""

import numpy as np
import pytest
from scipy import ndimage

from hfpapers.data import EMBEDDED, load
from hfpapers.data.referring import build_referring_scenes, vocabulary

PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (235, 200, 30),
           "purple": (140, 50, 180)}
KINDS = ("circle", "square", "triangle", "diamond", "star")
NOUNS = ("shape", "object")


def as_arrays(split):
    return [(np.asarray(row["image"]), np.asarray(row["mask"])) for row in split]


@pytest.fixture(scope="module")
def scenes():
    return build_referring_scenes(seed=5, num_train=160, num_test=40, image_size=96)


def test_deterministic_and_independent_of_set_size():
    a = build_referring_scenes(seed=1, num_train=6, num_test=3, image_size=32)
    b = build_referring_scenes(seed=1, num_train=6, num_test=3, image_size=32)
    longer = build_referring_scenes(seed=1, num_train=9, num_test=2, image_size=32)
    for split in ("train", "test"):
        assert list(a[split]["question"]) == list(b[split]["question"])
        assert list(a[split]["answer"]) == list(b[split]["answer"])
        for (ia, ma), (ib, mb) in zip(as_arrays(a[split]), as_arrays(b[split])):
            assert ia.tobytes() == ib.tobytes() and ma.tobytes() == mb.tobytes()
    assert list(longer["train"]["question"])[:6] == list(a["train"]["question"])
    assert list(longer["test"]["question"]) == list(a["test"]["question"])[:2]
    for (ia, ma), (ib, mb) in zip(as_arrays(longer["train"]), as_arrays(a["train"])):
        assert ia.tobytes() == ib.tobytes() and ma.tobytes() == mb.tobytes()
    other = build_referring_scenes(seed=2, num_train=6, num_test=0, image_size=32)
    assert list(other["train"]["question"]) != list(a["train"]["question"])


def test_columns_vocabulary_and_one_seg_token(scenes):
    words = set(vocabulary())
    assert vocabulary() == sorted(words) and len(words) < 150 and "[SEG]" in words
    train = scenes["train"]
    assert train.column_names == ["image", "question", "answer", "mask"]
    row = train[0]
    assert row["image"].mode == "RGB" and row["image"].size == (96, 96)
    assert row["mask"].mode == "L" and set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
    texts = [text for split in scenes.values() for column in ("question", "answer") for text in split[column]]
    for text in texts:
        assert text.replace("[SEG]", "") == text.replace("[SEG]", "").lower() and text == " ".join(text.split())
        assert set(text.split()) <= words, text
    for answer in [*train["answer"], *scenes["test"]["answer"]]:
        assert answer.split().count("[SEG]") == 1
    for question in train["question"]:
        assert "[SEG]" not in question
    # Every question family shows up.
    questions = " ".join(train["question"])
    for marker in ("largest", "smallest", "most", "left of", "above", "closest", "same colour", "same shape",
                   "different colour"):
        assert marker in questions, marker


# ------------------------------------------------------------------ an independent solver


def find_objects(image):
    """The shapes of an image. Each pixel is fitted as a mix of the background (the median colour) and one
    palette colour; it belongs to the best-fitting colour when that colour's share is at least 1/2. Connected
    regions of one colour are shapes; the kind comes from the fill ratio of the bounding box (square 1, circle
    pi/4, others about 1/2 or less), its aspect (a diamond is taller than wide) and where the widest row is (at the
    bottom of a triangle, a third of the way down a star)."""
    pixels = image.reshape(-1, 3).astype(float)
    background = np.median(pixels, axis=0)
    residuals, shares = [], []
    for colour in PALETTE.values():
        direction = np.array(colour) - background
        share = np.clip((pixels - background) @ direction / (direction @ direction), 0, 1)
        residuals.append(np.linalg.norm(pixels - background - share[:, None] * direction, axis=1))
        shares.append(share)
    best = np.argmin(residuals, axis=0)
    covered = np.take_along_axis(np.array(shares), best[None], axis=0)[0] > 0.47  # coverages: k / 16
    nearest = np.where(covered, best + 1, 0).reshape(image.shape[:2])
    objects = []
    for k, colour in enumerate(PALETTE, start=1):
        labels, count = ndimage.label(nearest == k, structure=np.ones((3, 3)))
        for j in range(1, count + 1):
            region = labels == j
            if region.sum() < 8:  # a few anti-aliased edge pixels between two colours
                continue
            ys, xs = np.nonzero(region)
            height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            fill, aspect = region.sum() / (height * width), width / height
            widths = region.sum(axis=1)[ys.min():ys.max() + 1]
            widest = np.flatnonzero(widths == widths.max()).mean() / max(height - 1, 1)  # 0 top, 1 bottom
            if fill > 0.86:
                kind = "square"
            elif fill > 0.65:
                kind = "circle"
            elif aspect < 0.85:
                kind = "diamond"
            else:
                kind = "triangle" if widest > 0.7 else "star"
            objects.append({"colour": colour, "kind": kind, "area": int(region.sum()), "x": xs.mean(),
                            "y": ys.mean(), "region": region})
    return objects


def size_of(obj, side):
    return "small" if obj["area"] < 0.055 * side * side else "large"  # large: 3x the area of small


def matching(objects, words, side):
    """Objects fitting a description such as "small red circle" or "blue object"."""
    out = []
    for obj in objects:
        ok = all((w not in PALETTE or obj["colour"] == w) and (w not in KINDS or obj["kind"] == w)
                 and (w not in ("small", "large") or size_of(obj, side) == w) for w in words)
        if ok:
            out.append(obj)
    return out


def the(objects, words, side):
    found = matching(objects, words, side)
    assert len(found) == 1, f"{' '.join(words)!r} matches {len(found)} shapes"
    return found[0]


def only(found, what):
    assert len(found) == 1, f"{what}: {len(found)} shapes"
    return found[0]


def solve(question, objects, height, width):
    """The shape a question refers to, from the question text and the shapes found in the image."""
    side = min(height, width)
    words = question.replace(" please output segmentation mask .", "").split()
    coordinate = {"leftmost": lambda o: -o["x"], "rightmost": lambda o: o["x"], "topmost": lambda o: -o["y"],
                  "bottommost": lambda o: o["y"]}
    if words[0] == "which":
        text = " ".join(words[1:-1])
        if "has a different colour from the others" in text:
            colours = [o["colour"] for o in objects]
            return only([o for o in objects if colours.count(o["colour"]) == 1], "odd colour")
        for phrase in (" has the same colour as the ", " has the same shape as the ", " is closest to the "):
            if phrase in text:
                head, anchor_words = text.split(phrase)
                anchor = the(objects, anchor_words.split(), side)
                others = [o for o in matching(objects, head.split(), side) if o is not anchor]
                if "colour" in phrase:
                    return only([o for o in others if o["colour"] == anchor["colour"]], text)
                if "shape" in phrase:
                    return only([o for o in others if o["kind"] == anchor["kind"]], text)
                distance = [np.hypot(o["x"] - anchor["x"], o["y"] - anchor["y"]) for o in others]
                order = np.argsort(distance)
                assert distance[order[0]] < 0.75 * distance[order[1]], text  # clearly the closest
                return others[order[0]]
        raise AssertionError(f"unknown question {question!r}")
    # A referring expression: between "the" and the end ("." / "?" / "in this image").
    start = words.index("the") + 1
    end = words.index("in") if "in" in words else len(words) - 1
    expression = " ".join(words[start:end])
    for relation, side_of in ((" to the left of the ", lambda o, a: o["x"] < a["x"]),
                              (" to the right of the ", lambda o, a: o["x"] > a["x"]),
                              (" above the ", lambda o, a: o["y"] < a["y"]),
                              (" below the ", lambda o, a: o["y"] > a["y"])):
        if relation in f" {expression} ":
            head, anchor_words = expression.split(relation)
            anchor = the(objects, anchor_words.split(), side)
            others = [o for o in matching(objects, head.split(), side) if o is not anchor]
            return only([o for o in others if side_of(o, anchor)], expression)
    first, *rest = expression.split()
    if first in ("largest", "smallest"):
        candidates = sorted(matching(objects, rest, side), key=lambda o: o["area"], reverse=first == "largest")
        assert len(candidates) >= 2
        ratio = candidates[0]["area"] / candidates[1]["area"]
        assert (ratio > 1.8) if first == "largest" else (ratio < 1 / 1.8), expression  # clearly
        return candidates[0]
    if first in coordinate:
        candidates = sorted(matching(objects, rest, side), key=coordinate[first], reverse=True)
        assert len(candidates) >= 2
        assert coordinate[first](candidates[0]) - coordinate[first](candidates[1]) > 0.08 * side, expression
        return candidates[0]
    return the(objects, expression.split(), side)


@pytest.mark.parametrize("split", ["train", "test"])
def test_each_mask_is_the_shape_the_question_refers_to(scenes, split):
    for row in scenes[split]:
        image, mask = np.asarray(row["image"]), np.asarray(row["mask"]) > 0
        objects = find_objects(image)
        target = solve(row["question"], objects, *image.shape[:2])
        inter = (target["region"] & mask).sum()
        assert inter / (target["region"] | mask).sum() > 0.8, row["question"]
        for other in objects:
            if other is not target:
                assert not (other["region"] & mask).any(), row["question"]
        # The masked pixels have the colour of the referred shape.
        mean = image[mask].astype(float).mean(0)
        assert np.abs(mean - PALETTE[target["colour"]]).max() < 20, row["question"]


def test_attribute_questions_name_the_masked_colour_and_kind(scenes):
    seen = 0
    for row in scenes["train"]:
        words = row["question"].split()
        if words[0] not in ("segment", "please", "can", "where", "what") or any(
                w in words for w in ("largest", "smallest", "left", "right", "above", "below", "leftmost",
                                     "rightmost", "topmost", "bottommost")):
            continue
        image, mask = np.asarray(row["image"]).astype(float), np.asarray(row["mask"]) > 0
        colour = min(PALETTE, key=lambda c: np.abs(image[mask].mean(0) - PALETTE[c]).sum())
        named = [w for w in words if w in PALETTE]
        assert named in ([], [colour]), row["question"]
        seen += bool(named)
    assert seen >= 5


def test_mask_is_the_half_covered_pixels():
    """On a plain background, a pixel's coverage is read back from its colour: the mask is coverage >= 1/2."""
    data = build_referring_scenes(seed=3, num_train=40, num_test=0, image_size=64)
    checked = anti_aliased = 0
    for row in data["train"]:
        image, mask = np.asarray(row["image"]).astype(float), np.asarray(row["mask"]) > 0
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        if not (corners == corners[0]).all() or len(np.unique(image.reshape(-1, 3), axis=0)) > 200:
            continue  # not a plain background
        background = corners[0]
        colour = np.array(min(PALETTE.values(), key=lambda c: np.abs(image[mask].mean(0) - c).sum()), float)
        direction = colour - background
        coverage = (image - background) @ direction / (direction @ direction)
        near = ndimage.binary_dilation(mask, structure=np.ones((3, 3)))  # the shape and its outline
        assert np.array_equal(mask[near], coverage[near] > 0.47)  # coverages are multiples of 1/16
        anti_aliased += bool(((coverage[near] > 0.01) & (coverage[near] < 0.99)).any())
        checked += 1
    assert checked >= 5 and anti_aliased >= checked - 1  # (a square's edges may fall on pixel borders)


@pytest.mark.parametrize("height, width", [(64, 112), (100, 64)])
def test_non_square_scenes(height, width):
    data = build_referring_scenes(seed=0, num_train=16, num_test=0, image_size=(height, width))
    for row in data["train"]:
        assert row["image"].size == row["mask"].size == (width, height)  # PIL sizes are (width, height)
        image, mask = np.asarray(row["image"]), np.asarray(row["mask"]) > 0
        target = solve(row["question"], find_objects(image), height, width)
        assert (target["region"] & mask).sum() / (target["region"] | mask).sum() > 0.8, row["question"]


def test_registered_and_loadable_by_name():
    assert EMBEDDED["referring_scenes"] is build_referring_scenes
    data = load("referring_scenes", num_train=3, num_test=2, image_size=32)
    assert len(data["train"]) == 3 and len(data["test"]) == 2


def test_families_option():
    data = build_referring_scenes(num_train=12, num_test=0, families=["odd_colour"], image_size=32)
    assert all("different colour from the others" in q for q in data["train"]["question"])
    pairs = build_referring_scenes(num_train=40, num_test=0, max_objects=2, image_size=32)  # no 3-shape families
    assert not any("closest" in q or "others" in q for q in pairs["train"]["question"])


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 16}, "at least 32 pixels"),
    ({"image_size": (64, 20)}, "at least 32 pixels"),
    ({"image_size": (64, 64, 3)}, r"int or \(height, width\)"),
    ({"image_size": "big"}, r"int or \(height, width\)"),
    ({"num_train": -1}, "num_train must be an integer >= 0"),
    ({"num_test": 2.5}, "num_test must be an integer >= 0"),
    ({"min_objects": 1}, "2 <= min_objects <= max_objects <= 4"),
    ({"min_objects": 3, "max_objects": 2}, "2 <= min_objects <= max_objects <= 4"),
    ({"max_objects": 5}, "2 <= min_objects <= max_objects <= 4"),
    ({"families": ["counting"]}, "families must be a non-empty subset"),
    ({"families": []}, "families must be a non-empty subset"),
    ({"max_objects": 2, "families": ["attribute", "closest"]}, r"\['closest'\] questions need max_objects >= 3"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_referring_scenes(**{"num_train": 1, "num_test": 1, **kwargs})
