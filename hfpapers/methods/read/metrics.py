"""gIoU and cIoU of reasoning segmentation, as LISA's `validate` computes them (READ reuses it).

Per mask pair: intersection I and union U of the binary predicted and reference masks (foreground class).
gIoU is the mean over pairs of I / (U + 1e-5), a pair with both masks empty (U = 0) counting as 1.0 (LISA's
`acc_iou[union_i == 0] += 1.0`, "no-object target"); cIoU is the cumulative sum(I) / (sum(U) + 1e-10) over the
whole set, so large objects weigh more in it than in gIoU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ious_from_counts", "segmentation_ious"]

_PAIR_EPS = 1e-5  # LISA: intersection_i / (union_i + 1e-5)
_TOTAL_EPS = 1e-10  # LISA: intersection_meter.sum / (union_meter.sum + 1e-10)


def _binary(mask, what: str) -> np.ndarray:
    """A 2-D boolean array from a bool / 0-1 (or 0-255) array, tensor, PIL image or nested list."""
    if hasattr(mask, "detach"):  # a torch tensor, on any device
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D mask, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{what} must hold booleans or numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isin(array, (0.0, 1.0)).all():
        raise ValueError(f"{what} holds values other than 0 and 1: threshold scores or logits first")
    return array != 0


def segmentation_ious(predictions: Sequence, references: Sequence) -> dict[str, float]:
    """{"giou", "ciou"} of predicted against reference masks (see the module docstring).

    Each element is a 2-D mask (bool or 0/1 array or tensor; integer masks count non-zero as foreground, so 0/255
    images work too); each prediction has its reference's shape.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted masks for {len(references)} reference masks")
    if len(predictions) == 0:
        raise ValueError("no masks to score")
    intersections, unions = [], []
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        predicted, true = _binary(prediction, f"prediction {i}"), _binary(reference, f"reference {i}")
        if predicted.shape != true.shape:
            raise ValueError(f"prediction {i} has shape {predicted.shape} but its reference has shape {true.shape}")
        intersections.append(int(np.count_nonzero(predicted & true)))
        unions.append(int(np.count_nonzero(predicted | true)))
    return ious_from_counts(intersections, unions)


def ious_from_counts(intersections: Sequence[float], unions: Sequence[float]) -> dict[str, float]:
    """{"giou", "ciou"} from per-pair intersection and union pixel counts."""
    ious = [inter / (union + _PAIR_EPS) if union else 1.0 for inter, union in zip(intersections, unions)]
    return {"giou": float(np.mean(ious)), "ciou": float(sum(intersections) / (sum(unions) + _TOTAL_EPS))}
