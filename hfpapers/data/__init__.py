"""Datasets: embedded ones built locally and deterministically, or any Hub id / local folder.

Every loader returns a `datasets.DatasetDict` with "train" and "test" splits and, for image classification,
the columns "image" (PIL) and "label" (a `ClassLabel`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .images import build_digits, build_shapes

EMBEDDED: dict[str, Callable[..., Any]] = {"digits": build_digits, "shapes": build_shapes}

__all__ = ["EMBEDDED", "build_digits", "build_shapes", "load"]


def load(
    name: str,
    *,
    image_column: str = "image",
    label_column: str = "label",
    test_split: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    **builder_kwargs: Any,
):
    """An embedded dataset by name, or `datasets.load_dataset(name)` for a Hub id or local folder.

    `image_column` / `label_column` map the source's columns onto "image" / "label". A source without a
    test split gets one carved out of "train" (`test_size`, seeded), since every method evaluates each epoch.
    """
    import datasets

    if name in EMBEDDED:
        return EMBEDDED[name](seed=seed, **builder_kwargs)
    if builder_kwargs:
        raise TypeError(f"options {sorted(builder_kwargs)} only apply to embedded datasets ({', '.join(EMBEDDED)})")
    source = str(Path(name)) if Path(name).exists() else name
    if Path(source).is_dir() and not any(Path(source).glob("*.py")):
        loaded = datasets.load_dataset("imagefolder", data_dir=source)
    else:
        loaded = datasets.load_dataset(source)
    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no 'train' split; splits found: {list(loaded)}")
    for split in loaded.values():
        missing = [c for c in (image_column, label_column) if c not in split.column_names]
        if missing:
            raise ValueError(
                f"dataset {name!r} has no column(s) {missing}; columns: {split.column_names}. "
                "Map yours with --image-column / --label-column"
            )
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    loaded = loaded.rename_columns(renames) if renames else loaded
    eval_split = test_split or next((s for s in ("test", "validation") if s in loaded), None)
    if eval_split is None:
        parts = loaded["train"].train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
        return datasets.DatasetDict(train=parts["train"], test=parts["test"])
    return datasets.DatasetDict(train=loaded["train"], test=loaded[eval_split])
