"""The continual-forgetting metrics of the paper (official `engine_cl.py::evaluate`), as fractions in [0, 1]."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["forgetting_metrics", "h_mean"]


def h_mean(drop: float, acc_r: float) -> float:
    """H-Mean = 2 * Drop * Acc_r / (Drop + Acc_r): high only when the forgotten classes dropped and the
    retained ones stayed; 0 when both are 0."""
    return 2 * drop * acc_r / (drop + acc_r) if drop + acc_r else 0.0


def _accuracy(predictions, references, keep) -> float | None:
    hits = [p == r for p, r in zip(predictions, references) if keep(r)]
    return sum(hits) / len(hits) if hits else None


def forgetting_metrics(predictions: Sequence[int], references: Sequence[int], forget_classes: Iterable[int],
                       old_classes: Iterable[int] = (), forget_accuracy_before: float | None = None) -> dict:
    """Acc_f on the classes forgotten in this task, Acc_o on those forgotten in earlier tasks, Acc_r on all
    others; Drop = forget_accuracy_before - Acc_f and the H-Mean of Drop and Acc_r when the accuracy before
    forgetting is given. An accuracy over no examples is None."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    forget, old = set(forget_classes), set(old_classes)
    if forget & old:
        raise ValueError(f"classes {sorted(forget & old)} are both forgotten now and in an earlier task")
    metrics = {
        "acc_f": _accuracy(predictions, references, lambda r: r in forget),
        "acc_r": _accuracy(predictions, references, lambda r: r not in forget and r not in old),
        "acc_o": _accuracy(predictions, references, lambda r: r in old),
    }
    metrics["drop"] = metrics["h_mean"] = None
    if forget_accuracy_before is not None and None not in (metrics["acc_f"], metrics["acc_r"]):
        metrics["drop"] = forget_accuracy_before - metrics["acc_f"]
        metrics["h_mean"] = h_mean(metrics["drop"], metrics["acc_r"])
    return metrics
