"""Procedures and analyses (DESIGN.md, "Kinds of method"): one base class, one entry point, one run folder.

A `Runner` applies a method to a given model (a folder or Hub id): a procedure changes it (forgetting, unlearning,
pruning) and saves the result, an analysis reads it and reports. `run` is the one entry point behind
`hfpapers run <slug>` and `accelerate launch -m hfpapers run <slug>`: it resolves the record's preset into the
runner's config once, loads the data, calls the runner and writes the run folder (`hfpapers_run.json`,
`results.json`, the card or report README) through `write_results`, which the runners' own `save_pretrained`
methods use too.
"""

from __future__ import annotations

import argparse
import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RUN_FILE = "hfpapers_run.json"  # how the run was made (method, preset, model, dataset, options)
RESULTS_FILE = "results.json"  # what a procedure or analysis measured (`RunResult`)

__all__ = ["Runner", "RunResult", "Table", "run", "write_results", "resolve_config", "RUN_FILE", "RESULTS_FILE"]


@dataclass
class Table:
    """One table of a report: rendered as markdown in the card and kept as data in results.json."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""  # one paragraph under the title: what the numbers mean

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def report(self, output_dir: Path, **details: Any) -> None:
        """Print the table and keep it, with `details`, in output_dir/results.json (a reproduction script's end)."""
        print(f"{self.title}\n\n{self.markdown()}\n\n{self.note}")
        (Path(output_dir) / RESULTS_FILE).write_text(json.dumps({**details, "table": asdict(self)}, indent=2))


@dataclass
class RunResult:
    """What a runner measured. `metrics` are the headline numbers (card model-index, zoo index); the first one is
    the headline metric."""

    summary: str  # one paragraph: what was done to which model
    metrics: dict[str, float]
    tables: list[Table] = field(default_factory=list)
    usage: str = ""  # a markdown snippet: how to load what the run saved
    details: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (JSON-friendly)
    base_model: str | None = None  # a Hub id the result derives from, for the card's base_model


class Runner(ABC):
    """The base class of a procedure's or an analysis's entry point.

    `config_class` is the dataclass of the method's hyper-parameters, filled from the record's preset;
    `add_arguments` adds the runner's own command-line options (e.g. which classes to forget), whose values
    reach `run` as keyword arguments.
    """

    config_class: type

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The runner's own options (`hfpapers run <slug> --help` shows them)."""

    @abstractmethod
    def run(self, config, model: str, datasets, output_dir: Path, **options) -> RunResult:
        """Apply the method to `model` (a folder or Hub id) with `datasets` ("train"/"test") and save what it
        makes into `output_dir` (the result files are written by `write_results`)."""


def resolve_config(record, preset: str | None, settings: dict[str, Any]):
    """The runner's config: the preset's values, then `settings`; unknown names are one clear error."""
    preset_values = record.get_preset(preset or record.default_preset)
    config_class = record.load(record.config_class)
    known = [f.name for f in fields(config_class)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise TypeError(f"unknown settings {unknown} for {record.slug!r}; its settings: {known}")
    return config_class(**{**preset_values.config, **settings}), dict(preset_values.training)


def write_results(output_dir: str | Path, slug: str, result: RunResult, run_info: dict[str, Any] | None = None,
                  config=None) -> Path:
    """Write results.json, hfpapers_run.json (when `run_info` is given) and the card README.md into `output_dir`."""
    from . import cards

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {**asdict(result), "config": asdict(config) if config is not None else None}
    (output_dir / RESULTS_FILE).write_text(json.dumps(payload, indent=2))
    if run_info is not None:
        (output_dir / RUN_FILE).write_text(json.dumps({"method": slug, **run_info}, indent=2))
    return cards.write_run_card(output_dir, slug)


def _start_output_dir(output: Path, overwrite: bool, process) -> None:
    """Refuse a used folder; with `overwrite`, empty an earlier run's folder (one holding its run file) only."""
    entries = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if entries:
        if not overwrite:
            raise FileExistsError(f"{output} is not empty (it holds {', '.join(entries[:5])}); pass "
                                  "overwrite_output_dir=True (--overwrite-output-dir) to run into it anew")
        if RUN_FILE not in entries:
            raise FileExistsError(f"{output} is not the folder of an earlier run (no {RUN_FILE}); it is left as it "
                                  "is: choose an empty --output-dir")
        process.wait_for_everyone()  # every process has looked before the main one deletes
        if process.is_main_process:
            shutil.rmtree(output)
    process.wait_for_everyone()


def run(slug: str, model: str, output_dir: str, *, preset: str | None = None, dataset: str | None = None,
        dataset_kwargs: dict[str, Any] | None = None, columns: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None, overwrite_output_dir: bool = False, **options) -> RunResult:
    """Run the procedure or analysis `slug` on `model` and write its run folder (main process only).

    A non-empty `output_dir` is refused, unless `overwrite_output_dir` and it is an earlier run's folder."""
    from accelerate import PartialState

    from . import data
    from .engine import process_state
    from .registry import TRAINED_KINDS, get_method

    record = get_method(slug)
    if record.kind in TRAINED_KINDS:
        raise ValueError(f"{slug!r} is a {record.kind} method: train it with `hfpapers train {slug}`")
    preset = preset or record.default_preset
    config, preset_options = resolve_config(record, preset, dict(settings or {}))
    options = {**preset_options, **{k: v for k, v in options.items() if v is not None}}
    dataset = dataset or record.dataset
    if dataset_kwargs is None:
        dataset_kwargs = dict(record.dataset_kwargs) if dataset == record.dataset else {}
    output = Path(output_dir)
    _start_output_dir(output, overwrite_output_dir, process_state())
    datasets = data.load(dataset, columns=dict(columns or {}), **dataset_kwargs)
    runner = record.load(record.runner)()
    result = runner.run(config, str(model), datasets, output, **options)
    if PartialState().is_main_process:
        info = {"preset": preset, "model": str(model), "dataset": dataset, "dataset_kwargs": dataset_kwargs,
                "columns": dict(columns or {}), "options": options, "num_processes": PartialState().num_processes}
        write_results(output, slug, result, info, config)
    return result
