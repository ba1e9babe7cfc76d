"""Embedded datasets are deterministic and balanced; local folders load with column mapping."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from hfpapers.data import load
from hfpapers.data.images import SHAPE_KINDS


def pixels(dataset):
    return np.stack([np.asarray(image) for image in dataset["image"]])


def test_shapes_are_deterministic_balanced_and_sized():
    a = load("shapes", resolution=12, num_train=40, num_test=10, num_classes=4, seed=3)
    b = load("shapes", resolution=12, num_train=40, num_test=10, num_classes=4, seed=3)
    assert np.array_equal(pixels(a["train"]), pixels(b["train"]))
    assert not np.array_equal(pixels(a["train"]), pixels(load("shapes", resolution=12, num_train=40, num_test=10,
                                                               num_classes=4, seed=4)["train"]))
    assert a["train"].features["label"].names == list(SHAPE_KINDS[:4])
    assert Counter(a["train"]["label"]) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert a["train"][0]["image"].size == (12, 12) and a["train"][0]["image"].mode == "RGB"
    # A sample does not depend on how many were asked for.
    longer = load("shapes", resolution=12, num_train=50, num_test=10, num_classes=4, seed=3)
    assert np.array_equal(pixels(longer["train"])[:40], pixels(a["train"]))


def test_shapes_draws_the_shape_it_labels():
    """A circle covers about pi/4 of its bounding box, a square all of it: check the drawn areas differ so."""
    from hfpapers.data.images import draw_shape

    # Seeds whose first draw picks a solid background (style 0), so the corner pixel is the background.
    solid = [s for s in range(50) if np.random.default_rng(s).integers(3) == 0][:4]
    for seed, (kind, expected) in zip(solid, [("circle", np.pi / 4), ("square", 1.0)] * 2):
        image = np.asarray(draw_shape(kind, 64, np.random.default_rng(seed))).astype(float)
        foreground = np.abs(image - image[0, 0]).sum(-1) > 60
        ys, xs = np.nonzero(foreground)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert abs(foreground.sum() / box - expected) < 0.12, kind


def test_digits_come_from_sklearn():
    from sklearn.datasets import load_digits

    digits = load("digits")
    assert len(digits["train"]) + len(digits["test"]) == len(load_digits().target) == 1797
    assert digits["train"].features["label"].names == [str(d) for d in range(10)]


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="num_classes must be between 1 and 10"):
        load("shapes", num_classes=11)
    with pytest.raises(TypeError, match="only apply to embedded datasets"):
        load("/some/folder", resolution=3)


def test_local_imagefolder_with_column_mapping(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (6, 6), (i * 40, 0, 0)).save(tmp_path / "train" / label / f"{i}.png")
    data = load(str(tmp_path), test_size=0.5)
    assert data["train"].features["label"].names == ["cat", "dog"]
    assert len(data["train"]) == len(data["test"]) == 4
    with pytest.raises(ValueError, match=r"no column\(s\) \['picture'\].*--column NAME=SOURCE"):
        load(str(tmp_path), columns={"image": "picture"})


def test_local_text_triplets_with_column_mapping(tmp_path):
    """Any dataset with (query, positive, negative) columns trains an embedding model; other names are mapped."""
    import json

    rows = [{"question": f"q{i}", "pos": f"p{i}", "neg": f"n{i}", "id": i} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    required = ("query", "positive", "negative")
    data = load(str(tmp_path), required=required, columns={"query": "question", "positive": "pos", "negative": "neg"},
                test_size=0.2)
    assert len(data["train"]) == 8 and len(data["test"]) == 2
    assert {"query", "positive", "negative"} <= set(data["train"].column_names)
    assert sorted([*data["train"]["query"], *data["test"]["query"]]) == sorted(r["question"] for r in rows)
    with pytest.raises(ValueError, match=r"no column\(s\) \['positive', 'negative'\]"):
        load(str(tmp_path), required=required, columns={"query": "question"})
    with pytest.raises(ValueError, match=r"cannot map column\(s\) \['label'\]"):
        load(str(tmp_path), required=required, columns={"label": "id"})


@pytest.mark.parametrize("name, options", [
    ("shapes", {"resolution": 8, "num_train": 4, "num_test": 2}),
    ("rgba_layers", {"resolution": 16, "num_train": 2, "num_test": 2}),
    ("referring_scenes", {"num_train": 2, "num_test": 2}),
    ("triplets", {"num_train": 2, "num_test": 2}),
])
def test_building_an_embedded_dataset_shows_a_progress_bar_unless_bars_are_off(capsys, name, options):
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    load(name, **options)
    err = capsys.readouterr().err
    assert f"building {name} (train)" in err and f"building {name} (test)" in err and "100%" in err, err
    disable_progress_bars("hfpapers")  # this library's bars only
    try:
        load(name, **options)
    finally:
        enable_progress_bars("hfpapers")
    assert capsys.readouterr().err == ""
    logging.disable_progress_bar()  # every Hugging Face bar, as transformers turns them off
    try:
        load(name, **options)
    finally:
        logging.enable_progress_bar()
    assert capsys.readouterr().err == ""
