"""READ's gIoU / cIoU (LISA's `validate`): hand-worked masks, the empty-mask convention, bad input, and the
`evaluate` module giving the same numbers."""

import numpy as np
import pytest
import torch

from conftest import REPO
from hfpapers.methods.read.metrics import segmentation_ious

# Pair 1: I = 4, U = 6 (IoU 2/3). Pair 2: one pixel each, not the same one: I = 0, U = 2 (IoU 0).
PREDICTIONS = [[[1, 1, 0], [1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 1, 0], [0, 0, 0]]]
REFERENCES = [[[1, 1, 1], [1, 1, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 1], [0, 0, 0]]]
EMPTY = [[0, 0], [0, 0]]


def test_by_hand_giou_is_the_mean_and_ciou_the_cumulative_ratio():
    got = segmentation_ious(PREDICTIONS, REFERENCES)
    # gIoU = (2/3 + 0) / 2 = 1/3; cIoU = (4 + 0) / (6 + 2) = 1/2: the large object weighs more in cIoU.
    assert got == pytest.approx({"giou": 1 / 3, "ciou": 0.5}, abs=1e-6)
    assert isinstance(got["giou"], float) and isinstance(got["ciou"], float)
    # LISA divides each intersection by union + 1e-5, so a perfect prediction scores just under 1.
    perfect = segmentation_ious(REFERENCES, REFERENCES)
    assert perfect["giou"] == pytest.approx((6 / (6 + 1e-5) + 1 / (1 + 1e-5)) / 2, rel=1e-12)
    assert perfect == pytest.approx({"giou": 1.0, "ciou": 1.0}, abs=1e-5)


def test_both_masks_empty_counts_as_one():
    # Pairs: IoU 2/3, 0 and 1 (both empty, union 0): gIoU = 5/9; the empty pair adds nothing to cIoU.
    got = segmentation_ious(PREDICTIONS + [EMPTY], REFERENCES + [EMPTY])
    assert got == pytest.approx({"giou": 5 / 9, "ciou": 0.5}, abs=1e-6)
    # An empty prediction of a non-empty reference is IoU 0, not 1.
    assert segmentation_ious([EMPTY], [[[0, 1], [0, 0]]]) == pytest.approx({"giou": 0.0, "ciou": 0.0})
    # A set of empty pairs only: gIoU 1, cIoU 0 / (0 + 1e-10) = 0, as LISA's meters give.
    assert segmentation_ious([EMPTY], [EMPTY]) == {"giou": 1.0, "ciou": 0.0}


def test_arrays_tensors_and_mask_images_agree():
    expected = segmentation_ious(PREDICTIONS, REFERENCES)
    as_bool = [np.array(m, dtype=bool) for m in PREDICTIONS]
    as_tensor = [torch.tensor(m) for m in REFERENCES]
    assert segmentation_ious(as_bool, as_tensor) == expected
    as_255 = [np.array(m, dtype=np.uint8) * 255 for m in PREDICTIONS]  # mode "L" mask images
    assert segmentation_ious(as_255, [torch.tensor(m, dtype=torch.float32) for m in REFERENCES]) == expected
    # Masks of different sizes in one set.
    mixed = segmentation_ious(PREDICTIONS + [[[1, 1, 1, 1]]], REFERENCES + [[[1, 1, 0, 0]]])
    assert mixed == pytest.approx({"giou": (2 / 3 + 0 + 1 / 2) / 3, "ciou": 6 / 12}, abs=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match=r"prediction 1 has shape \(2, 2\) but its reference has shape \(3, 3\)"):
        segmentation_ious([REFERENCES[0], EMPTY], REFERENCES)
    with pytest.raises(ValueError, match="2 predicted masks for 1 reference masks"):
        segmentation_ious(PREDICTIONS, REFERENCES[:1])
    with pytest.raises(ValueError, match="no masks"):
        segmentation_ious([], [])
    with pytest.raises(ValueError, match="must be a 2-D mask"):
        segmentation_ious([np.zeros((1, 3, 3))], [np.zeros((1, 3, 3))])
    with pytest.raises(ValueError, match="threshold scores or logits first"):
        segmentation_ious([np.full((3, 3), 0.7)], REFERENCES[:1])


def test_evaluate_module_gives_the_same_numbers():
    import evaluate

    module = evaluate.load(str(REPO / "evaluation" / "metrics" / "reasoning_segmentation"))
    predictions, references = PREDICTIONS + [EMPTY], REFERENCES + [EMPTY]
    got = module.compute(predictions=predictions, references=references)
    assert got == segmentation_ious(predictions, references)
    assert got == pytest.approx({"giou": 5 / 9, "ciou": 0.5}, abs=1e-6)
    assert "qian2025reasoning" in module.citation
