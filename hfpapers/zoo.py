"""`hfpapers zoo build`: every registered method's default preset, trained on its embedded data, evaluated,
carded and packaged into zoo/<slug>-<preset>/, with zoo/INDEX.md as the table of contents."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .engine import RESULTS_FILE, train
from .registry import get_method, list_methods


def build_zoo(output_dir: str = "zoo", methods: list[str] | None = None) -> Path:
    records = [get_method(slug) for slug in methods] if methods else list_methods()
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for record in records:
        folder = root / f"{record.slug}-{record.default_preset}"
        if folder.exists():
            shutil.rmtree(folder)  # a stale package must never be mistaken for this build's
        print(f"[zoo] {record.slug}: training preset {record.default_preset!r} on {record.dataset!r} "
              f"(budget {record.time_budget_s} s)", flush=True)
        method_started = time.perf_counter()
        train(record.slug, str(folder), progress_bar=False)
        seconds = time.perf_counter() - method_started
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # resume state; the package is the model
        results = json.loads((folder / RESULTS_FILE).read_text())
        recipe_metric = record.load(record.recipe).metric
        rows.append((record, folder, results, recipe_metric, seconds))
        if seconds > record.time_budget_s:
            print(f"[zoo] warning: {record.slug} took {seconds:.0f} s, over its budget of {record.time_budget_s} s")
    index = root / "INDEX.md"
    lines = ["# hfpapers zoo", "",
             "| method | paper | preset | params | test metric | train + eval seconds | folder |",
             "|---|---|---|---|---|---|---|"]
    for record, folder, results, metric, seconds in rows:
        lines.append(
            f"| {record.slug} | [{record.title}]({record.arxiv_url}) | {record.default_preset} | "
            f"{results['num_parameters']:,} | {metric} {results['eval'][metric]:.4f} on {record.dataset} | "
            f"{seconds:.1f} | {folder.name} |"
        )
    lines += ["", f"Built in {time.perf_counter() - started:.0f} s."]
    index.write_text("\n".join(lines) + "\n")
    print(index.read_text())
    return index
