"""`hfpapers zoo build`: every record's default preset on its embedded data, packaged into zoo/<slug>-<preset>/,
with zoo/INDEX.md as the table of contents. Trained kinds are trained, evaluated and carded; procedures and
analyses then run on the zoo model of their record's `base_method` (built first when it was not asked for)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .engine import RESULTS_FILE, train
from .registry import TRAINED_KINDS, get_method, list_methods
from .runs import run

# `make zoo` builds every paper's default within 20 minutes on 2 cores; each record's `time_budget_s` is its share
# (the records' budgets together may not exceed it: tests/test_zoo.py).
ZOO_BUDGET_S = 1200
ZOO_PAPERS = 26  # the papers hfpapers brings (one record each when all have landed)


def _folder(root: Path, record) -> Path:
    return root / f"{record.slug}-{record.default_preset}"


def _build(record, folder: Path, root: Path) -> tuple[str, float]:
    """Build one record's zoo entry; returns its headline metric's name and value."""
    if record.kind in TRAINED_KINDS:
        train(record.slug, str(folder), progress_bar=False)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # resume state; the package is the model
        metric = record.load(record.recipe).metric
        return metric, json.loads((folder / RESULTS_FILE).read_text())["eval"][metric]
    base = _folder(root, get_method(record.base_method))
    result = run(record.slug, str(base), str(folder))
    shutil.rmtree(folder / "runs", ignore_errors=True)  # the engine's per-task resume state
    metric = next(iter(result.metrics))
    return metric, result.metrics[metric]


def build_zoo(output_dir: str = "zoo", methods: list[str] | None = None) -> Path:
    records = [get_method(slug) for slug in methods] if methods else list_methods()
    # A procedure's or analysis's base model is built first, also when it was not asked for.
    bases = [get_method(r.base_method) for r in records if r.kind not in TRAINED_KINDS]
    records = sorted({r.slug: r for r in [*records, *bases]}.values(), key=lambda r: (r.kind not in TRAINED_KINDS, r.slug))
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for record in records:
        folder = _folder(root, record)
        if folder.exists():
            shutil.rmtree(folder)  # a stale package must never be mistaken for this build's
        on = f"{record.base_method}'s zoo model" if record.kind not in TRAINED_KINDS else repr(record.dataset)
        print(f"[zoo] {record.slug} ({record.kind}): preset {record.default_preset!r} on {on} "
              f"(budget {record.time_budget_s} s)", flush=True)
        method_started = time.perf_counter()
        metric, value = _build(record, folder, root)
        seconds = time.perf_counter() - method_started
        rows.append((record, folder, metric, value, seconds))
        if seconds > record.time_budget_s:
            print(f"[zoo] warning: {record.slug} took {seconds:.0f} s, over its budget of {record.time_budget_s} s")
    index = root / "INDEX.md"
    lines = ["# hfpapers zoo", "",
             "| method | kind | paper | preset | headline metric | seconds / budget | folder |",
             "|---|---|---|---|---|---|---|"]
    for record, folder, metric, value, seconds in rows:
        lines.append(
            f"| {record.slug} | {record.kind} | [{record.title}]({record.arxiv_url}) | {record.default_preset} | "
            f"{metric} {value:.4f} on {record.dataset} | {seconds:.1f} / {record.time_budget_s} | {folder.name} |"
        )
    budgets = sum(r.time_budget_s for r in list_methods())
    lines += ["", f"Built in {time.perf_counter() - started:.0f} s. The zoo of all {ZOO_PAPERS} papers has "
              f"{ZOO_BUDGET_S} s on 2 cores; the {len(list_methods())} records registered now hold {budgets} s of it."]
    index.write_text("\n".join(lines) + "\n")
    print(index.read_text())
    return index
