"""`train` and `evaluate_folder`: a registered method end to end, through the loop and into a run folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from . import run_folder as rf
from .arguments import TrainingArguments
from .loop import FitResult, evaluate, fit
from .state import process_state


def train(
    slug: str,
    output_dir: str,
    preset: str | None = None,
    dataset: str | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    columns: dict[str, str] | None = None,
    config_overrides: dict[str, Any] | None = None,
    **settings: Any,
) -> FitResult:
    """Train a registered method end to end: data, model, fit, then config + safetensors + card in output_dir.

    `columns` maps the recipe's column names onto a non-embedded dataset's (e.g. {"image": "img"}).
    `settings` are `TrainingArguments` fields or fields of the method's recipe (label smoothing, ...); they
    override the preset's training arguments (`Preset.training` in the record). A non-empty `output_dir` is refused
    unless `overwrite_output_dir=True` or `resume_from` is given.
    """
    from accelerate import PartialState
    from accelerate.utils import set_seed
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from .. import cards, data
    from ..registry import get_method

    record = get_method(slug)
    config_overrides = dict(config_overrides or {})
    resolved = record.resolve(preset, config_overrides)  # an unknown preset fails before any data is built
    preset = resolved.name
    recipe_class = record.load(record.recipe)
    settings = {**resolved.training, **settings}
    recipe_fields = [f.name for f in fields(recipe_class)] if is_dataclass(recipe_class) else []
    unknown = set(settings) - set(TrainingArguments.field_names()) - set(recipe_fields)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; training arguments: {TrainingArguments.field_names()}; "
                        f"recipe fields: {recipe_fields}")
    recipe = recipe_class(**{k: v for k, v in settings.items() if k in recipe_fields})
    args = TrainingArguments(output_dir=output_dir, **{k: v for k, v in settings.items() if k not in recipe_fields})
    recipe.check_arguments(args)
    if resolved.config_class is not None:
        resolved.new_config()  # a bad config value fails here, not after the data is built
    _start_output_dir(Path(output_dir), args, process_state())
    if args.resume_from is not None:
        rf.find_checkpoint(Path(output_dir), args.resume_from)  # none to resume from fails before the data is built
    dataset = dataset or record.dataset
    if dataset_kwargs is None:
        dataset_kwargs = dict(record.dataset_kwargs) if dataset == record.dataset else {}
    columns = dict(columns or {})
    # `progress_bar=False` (`--no-progress`) also silences the bars of data building and warm-up stages.
    quiet = not args.progress_bar and not are_progress_bars_disabled("hfpapers")
    if quiet:
        disable_progress_bars("hfpapers")
    try:
        datasets = data.load(dataset, required=recipe.columns, columns=columns, seed=args.seed, **dataset_kwargs)
        set_seed(args.seed)  # the same initial weights for the same seed, resumed or not
        model, processor = recipe.build_model(resolved, datasets, args)
    finally:
        if quiet:
            enable_progress_bars("hfpapers")
    run = {"method": slug, "preset": preset, "dataset": dataset, "dataset_kwargs": dataset_kwargs,
           "columns": columns, "config_overrides": config_overrides}
    result = fit(model, datasets, recipe, args, processor, run=run)
    if PartialState().is_main_process:
        rf.write_json(Path(output_dir, rf.RUN_FILE), {
            **run, "training_arguments": asdict(args), "recipe": asdict(recipe) if is_dataclass(recipe) else {},
            "num_processes": PartialState().num_processes})
        rf.write_json(Path(output_dir, rf.RESULTS_FILE), {
            "train_seconds": result.train_seconds, "global_step": result.global_step, "epochs": result.epochs,
            "eval": result.eval_metrics, "examples_per_process": result.examples_per_process,
            "num_parameters": sum(p.numel() for p in model.parameters())})
        with rf.writing(Path(output_dir, "README.md")):
            cards.write_card(output_dir)
    return result


def warm_start(output_dir: str | Path, build_model, datasets, recipe, *, seed: int, processor=None,
               **settings: Any) -> Path:
    """An earlier stage of a multi-stage method (a decoder's language-model warm-up, SAM on point prompts, a small
    VAE), trained through `fit` into `output_dir` and saved there; returns the folder.

    `build_model()` makes the stage's fresh model (seeded with `seed`); `settings` are its `TrainingArguments`.
    A folder that already holds the saved stage (`config.json`) is reused. A stage that did not finish starts over:
    its folder is only a cache of the result, and its resume state is dropped once the result is saved.
    """
    from accelerate import PartialState

    output_dir = Path(output_dir)
    if not (output_dir / "config.json").exists():
        torch.manual_seed(seed)
        args = TrainingArguments(output_dir=str(output_dir), seed=seed, overwrite_output_dir=True, **settings)
        fit(build_model(), datasets, recipe, args, processor, desc=f"warm-up {output_dir.name}")
        if PartialState().is_main_process:
            shutil.rmtree(output_dir / rf.CHECKPOINTS_DIR, ignore_errors=True)
        PartialState().wait_for_everyone()
    return output_dir


def _start_output_dir(output_dir: Path, args: TrainingArguments, process) -> None:
    """Refuse a used folder before anything is built into it (a recipe's warm-start stage writes there first)."""
    if args.resume_from is None and output_dir.is_dir() and (entries := sorted(p.name for p in output_dir.iterdir())):
        if not args.overwrite_output_dir:
            rf.refuse_used_folder(output_dir, entries)
        process.wait_for_everyone()  # every process has looked before the main one deletes
        if process.is_main_process:
            rf.clear_previous_run(output_dir)
    process.wait_for_everyone()


def _record_of_folder(folder: Path, run: dict):
    """The method of a saved folder: its config's model_type, else the run file of `train`."""
    from ..registry import get_method, method_for_model_type

    config_file = folder / "config.json"
    if config_file.exists():
        return method_for_model_type(json.loads(config_file.read_text()).get("model_type"))
    if "method" in run:
        return get_method(run["method"])
    raise FileNotFoundError(f"{folder} has neither config.json nor {rf.RUN_FILE}; expected a folder written by "
                            "save_pretrained or `hfpapers train`")


def evaluate_folder(folder: str, dataset: str | None = None) -> dict[str, float]:
    """Evaluate a saved model folder on the test split of the dataset it was trained on (or `dataset`).

    Writes eval_results.json next to the weights and returns the metrics.
    """
    from accelerate import Accelerator

    from .. import data
    from ..registry import load_pretrained

    folder_path = Path(folder)
    run_file = folder_path / rf.RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    record = _record_of_folder(folder_path, run)
    if dataset is None:
        dataset = run.get("dataset", record.dataset)
    if dataset == run.get("dataset"):
        dataset_kwargs = run["dataset_kwargs"]
    elif dataset == record.dataset:
        dataset_kwargs = dict(record.dataset_kwargs)
    else:
        dataset_kwargs = {}
    model = load_pretrained(record, folder)
    recipe = record.load(record.recipe)()
    processor = None
    if record.processor:
        import transformers

        processor = getattr(transformers, recipe.processor_class).from_pretrained(folder)
    test = data.load(dataset, required=recipe.columns, columns=run.get("columns"), **dataset_kwargs)["test"]
    recipe.check_eval_dataset(model, test)
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    eval_dl = torch.utils.data.DataLoader(recipe.prepare_dataset(test, processor), collate_fn=recipe.collate,
                                          batch_size=256)
    model, eval_dl = accelerator.prepare(model, eval_dl)
    metrics = evaluate(accelerator, model, eval_dl, recipe)
    if accelerator.is_main_process:
        (folder_path / "eval_results.json").write_text(json.dumps({"dataset": dataset, **metrics}, indent=2))
    return metrics
