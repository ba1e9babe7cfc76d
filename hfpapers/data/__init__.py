"""Datasets: embedded ones built locally and deterministically, or any Hub id / local folder.

Every loader returns a `datasets.DatasetDict` with "train" and "test" splits and, for image classification,
the columns "image" (PIL) and "label" (a `ClassLabel`); for text embedding, "query", "positive" and
"negative" strings; for transparent layers, "image" (RGBA PIL); for reasoning segmentation, "image" (RGB PIL),
"question" and "answer" strings (the answer holds one "[SEG]") and "mask" (mode "L" PIL, 0 / 255).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from .captioned_shapes import build_captioned_shapes
from .images import build_digits, build_shapes
from .layers import build_rgba_layers
from .referring import build_referring_scenes
from .text import build_triplets
from .views import build_view_pairs

EMBEDDED: dict[str, Callable[..., Any]] = {"digits": build_digits, "shapes": build_shapes, "triplets": build_triplets,
                                          "rgba_layers": build_rgba_layers, "referring_scenes": build_referring_scenes,
                                          "captioned_shapes": build_captioned_shapes, "view_pairs": build_view_pairs}

__all__ = ["EMBEDDED", "build_captioned_shapes", "build_digits", "build_referring_scenes", "build_rgba_layers",
           "build_shapes", "build_triplets", "build_view_pairs", "load"]


# Files of a table of examples (rather than an image folder of class sub-folders).
_TABLE_SUFFIXES = {".parquet", ".arrow", ".jsonl", ".json", ".csv"}


def load(
    name: str,
    *,
    required: tuple[str, ...] = ("image", "label"),
    columns: Mapping[str, str] | None = None,
    test_split: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    **builder_kwargs: Any,
):
    """An embedded dataset by name, or `datasets.load_dataset(name)` for a Hub id or local folder.

    `required` are the columns the caller reads; `columns` maps them onto the source's names
    ({"image": "img"}). A source without a test split gets one carved out of "train" (`test_size`, seeded,
    stratified when there is a "label" column), since every method evaluates each epoch.
    """
    import datasets

    columns = dict(columns or {})
    if name in EMBEDDED:
        if columns:
            raise TypeError(f"column mapping only applies to Hub or local datasets, not embedded {name!r}")
        return EMBEDDED[name](seed=seed, **builder_kwargs)
    if builder_kwargs:
        raise TypeError(f"options {sorted(builder_kwargs)} only apply to embedded datasets ({', '.join(EMBEDDED)})")
    unknown = set(columns) - set(required)
    if unknown:
        raise ValueError(f"cannot map column(s) {sorted(unknown)}: this method reads {list(required)}")
    source = str(Path(name)) if Path(name).exists() else name
    if Path(source).is_dir() and "image" in required and not any(
            f.suffix in _TABLE_SUFFIXES or f.suffix == ".py" for f in Path(source).rglob("*")):
        loaded = datasets.load_dataset("imagefolder", data_dir=source)
    else:
        loaded = datasets.load_dataset(source)
    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no 'train' split; splits found: {list(loaded)}")
    sources = {column: columns.get(column, column) for column in required}
    for split in loaded.values():
        missing = [c for c in sources.values() if c not in split.column_names]
        if missing:
            raise ValueError(
                f"dataset {name!r} has no column(s) {missing}; columns: {split.column_names}. "
                "Map yours with --column NAME=SOURCE"
            )
    renames = {old: new for new, old in sources.items() if old != new}
    loaded = loaded.rename_columns(renames) if renames else loaded
    eval_split = test_split or next((s for s in ("test", "validation") if s in loaded), None)
    if eval_split is None:
        stratify = "label" if "label" in required else None
        parts = loaded["train"].train_test_split(test_size=test_size, seed=seed, stratify_by_column=stratify)
        return datasets.DatasetDict(train=parts["train"], test=parts["test"])
    return datasets.DatasetDict(train=loaded["train"], test=loaded[eval_split])
