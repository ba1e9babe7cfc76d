"""The one Accelerate training loop every method uses.

`fit` trains a model with a method's `Recipe`: gradient accumulation, mixed precision, evaluation each epoch,
`accelerator.save_state` checkpoints, exact resume, a progress bar, metrics as JSON lines and a PNG of the
curves. `train` wraps it for a registered method: dataset, model, processor, fit, save_pretrained and card.
The same code runs under `python`, `hfpapers train` and `accelerate launch` (any number of processes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"  # written last in a checkpoint: its presence marks the checkpoint complete
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
RESULTS_FILE = "train_results.json"
RUN_FILE = "hfpapers_run.json"  # how the run was made (method, preset, dataset, arguments), read by `eval`


@dataclass
class TrainingArguments:
    output_dir: str
    num_epochs: int = 10
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"  # any transformers `get_scheduler` name: constant, cosine, linear, ...
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    ema_decay: float | None = None  # keep an exponential moving average of the weights; it is evaluated and saved
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    checkpoint_every_steps: int | None = None  # besides the checkpoint at the end of every epoch
    keep_checkpoints: int = 2
    resume_from: str | None = None  # a checkpoint folder, or "latest" (the newest complete one in output_dir)
    log_every_steps: int = 10
    progress_bar: bool = True

    def __post_init__(self):
        for name in ("num_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "keep_checkpoints", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be one of no, bf16, fp16; got {self.mixed_precision!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class TensorDataset(torch.utils.data.Dataset):
    """Named tensors that share their first dimension; item i is {name: tensor[i]}.

    Small datasets are encoded once into memory: indexing a tensor is far cheaper than decoding a row.
    """

    def __init__(self, **tensors: torch.Tensor):
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors must share their first dimension, got lengths {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


class Recipe(ABC):
    """How a method trains: its hyper-parameters, data preparation, model building, loss, optimiser and metrics.

    Subclasses live in `methods/<slug>/recipe.py`. `defaults` holds the method's `TrainingArguments` values;
    `step_rng` passed to `compute_loss` is seeded from (seed, process, micro-step), so random augmentation
    reproduces exactly on resume. While training, the engine keeps `epoch`, `num_epochs` and `ema_model` (the
    weight average, when `ema_decay` is set) current on the recipe, for losses that change over training.
    """

    defaults: dict[str, Any] = {}
    preset_defaults: dict[str, dict[str, Any]] = {}  # per preset, e.g. CPU-sized arguments for "tiny"
    metric: str = "accuracy"  # the headline eval metric (for the card and the zoo index)
    columns: tuple[str, ...] = ()  # the dataset columns `prepare_dataset` reads
    processor_class: str = "AutoProcessor"  # the transformers Auto class that reloads the saved processor
    epoch: int = 0
    num_epochs: int = 1
    ema_model: torch.nn.Module | None = None

    def build_model(self, slug: str, preset: str, datasets, config_overrides: dict[str, Any],
                    args: TrainingArguments):
        """The model to train and its processor (None for none), for `datasets` ("train"/"test")."""
        from .registry import create_model, create_processor

        model = create_model(slug, preset, **config_overrides)
        return model, create_processor(slug, model.config)

    def build_scheduler(self, optimizer, args: TrainingArguments, total_steps: int, steps_per_epoch: int):
        """The learning-rate schedule, stepped once per optimiser step."""
        from transformers import get_scheduler

        return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                             num_training_steps=total_steps)

    @abstractmethod
    def prepare_dataset(self, dataset, processor) -> torch.utils.data.Dataset:
        """One split of a `datasets.Dataset` as a torch dataset whose items `collate` batches."""

    def check_eval_dataset(self, model, dataset) -> None:
        """Raise when a dataset cannot evaluate `model` (e.g. other labels); called by `evaluate_folder`."""

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate(examples)

    def build_optimizer(self, model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def compute_loss(self, model, batch: dict, step_rng: torch.Generator) -> torch.Tensor:
        return model(**batch).loss

    def backward(self, accelerator, model, batch: dict, step_rng: torch.Generator) -> torch.Tensor:
        """One micro-batch's gradients; returns its loss (for logging). Override for losses that need their
        own backward schedule (e.g. a gradient cache)."""
        loss = self.compute_loss(model, batch, step_rng)
        accelerator.backward(loss)
        return loss.detach()

    @abstractmethod
    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example tensors to gather across processes for `compute_metrics`."""

    @abstractmethod
    def compute_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics over the whole eval set from the gathered `eval_outputs`."""


class ImageClassificationRecipe(Recipe):
    """Images through the model's image processor once, up front; accuracy and loss on the test split."""

    columns = ("image", "label")
    processor_class = "AutoImageProcessor"

    def build_model(self, slug: str, preset: str, datasets, config_overrides: dict[str, Any],
                    args: TrainingArguments):
        names = datasets["train"].features["label"].names
        labels = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                  "label2id": {n: i for i, n in enumerate(names)}}
        return super().build_model(slug, preset, datasets, {**labels, **config_overrides}, args)

    def prepare_dataset(self, dataset, processor) -> TensorDataset:
        return TensorDataset(
            pixel_values=torch.as_tensor(processor(list(dataset["image"]), return_tensors="np")["pixel_values"]),
            labels=torch.as_tensor(list(dataset["label"])),
        )

    def check_eval_dataset(self, model, dataset) -> None:
        names = dataset.features["label"].names
        if names != [model.config.id2label[i] for i in range(len(model.config.id2label))]:
            raise ValueError(f"the dataset's labels {names} differ from the model's "
                             f"{list(model.config.id2label.values())}")

    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return {"predictions": logits.argmax(-1), "labels": batch["labels"], "loss": loss}

    def compute_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"accuracy": (outputs["predictions"] == outputs["labels"]).float().mean().item(),
                "loss": outputs["loss"].mean().item()}


@dataclass
class FitResult:
    global_step: int
    epochs: int
    train_seconds: float
    eval_metrics: dict[str, float]
    examples_per_process: list[int]  # training examples each process stepped through (this run, after resume)
    history: list[dict] = field(default_factory=list)


def fit(model, datasets, recipe: Recipe, args: TrainingArguments, processor=None) -> FitResult:
    """Train `model` on `datasets` ("train"/"test") with `recipe`; checkpoints and metrics go to args.output_dir."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        # On a machine without an accelerator, `cpu=True` is what lets `accelerate launch` processes form a
        # gloo group (MULTI_CPU); without it each would train alone.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # A seeded sampler makes each epoch's order a function of (seed, epoch): resume replays it exactly.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    set_seed(args.seed)
    train_set, eval_set = (recipe.prepare_dataset(datasets[split], processor) for split in ("train", "test"))
    train_dl = torch.utils.data.DataLoader(
        train_set, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=recipe.collate,
        drop_last=True,
    )
    eval_dl = torch.utils.data.DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=recipe.collate)
    if len(train_dl) // accelerator.num_processes < args.gradient_accumulation_steps:
        raise ValueError(
            f"{len(train_set)} training examples make fewer than gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} batches of {args.per_device_train_batch_size} per process"
        )
    optimizer = recipe.build_optimizer(model, args)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    steps_per_epoch = len(train_dl) // args.gradient_accumulation_steps
    total_steps = steps_per_epoch * args.num_epochs
    # Stepped by hand once per optimiser step (accelerate's wrapper would step it once per process).
    scheduler = recipe.build_scheduler(optimizer, args, total_steps, steps_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
    ema = None
    if args.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay),
                            use_buffers=True)
        accelerator.register_for_checkpointing(ema)
    recipe.ema_model, recipe.num_epochs = (ema.module if ema is not None else None), args.num_epochs

    state = {"epoch": 0, "batches_done": 0, "global_step": 0, "train_seconds": 0.0, "history": []}
    if args.resume_from:
        checkpoint = _find_checkpoint(output_dir, args.resume_from)
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        if accelerator.is_main_process:
            _rewrite_metrics(output_dir, state["history"])
        accelerator.print(f"resumed from {checkpoint} (epoch {state['epoch']}, step {state['global_step']})")
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / METRICS_FILE).write_text("")

    progress = tqdm(total=total_steps, initial=state["global_step"], desc="train", dynamic_ncols=True,
                    disable=not (args.progress_bar and accelerator.is_local_main_process))
    started = time.perf_counter() - state["train_seconds"]
    examples_seen = 0
    model.train()
    for epoch in range(state["epoch"], args.num_epochs):
        train_dl.set_epoch(epoch)
        recipe.epoch = epoch
        batches = accelerator.skip_first_batches(train_dl, state["batches_done"]) if state["batches_done"] else train_dl
        for batch in batches:
            micro_step = epoch * len(train_dl) + state["batches_done"]
            step_rng = torch.Generator().manual_seed(
                (args.seed * 1_000_003 + accelerator.process_index) * 1_000_003 + micro_step)
            with accelerator.accumulate(model):
                loss = recipe.backward(accelerator, model, batch, step_rng)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state["batches_done"] += 1
            examples_seen += _batch_size(batch)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
            state["global_step"] += 1
            progress.update(1)
            step = state["global_step"]
            if step % args.log_every_steps == 0 or step == total_steps:
                record = {"step": step, "epoch": epoch + state["batches_done"] / len(train_dl),
                          "loss": accelerator.reduce(loss, "mean").item(), "lr": scheduler.get_last_lr()[0]}
                _log(accelerator, output_dir, state, record)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            if args.checkpoint_every_steps and step % args.checkpoint_every_steps == 0:
                _save_checkpoint(accelerator, output_dir, state, started, args.keep_checkpoints)
        metrics = evaluate(accelerator, ema.module if ema is not None else model, eval_dl, recipe)
        model.train()
        state["epoch"], state["batches_done"] = epoch + 1, 0
        _log(accelerator, output_dir, state, {"step": state["global_step"], "epoch": epoch + 1,
                                              **{f"eval_{k}": v for k, v in metrics.items()}})
        accelerator.print(f"epoch {epoch + 1}/{args.num_epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        _save_checkpoint(accelerator, output_dir, state, started, args.keep_checkpoints)
    progress.close()

    final = next((r for r in reversed(state["history"]) if any(k.startswith("eval_") for k in r)), {})
    result = FitResult(
        global_step=state["global_step"], epochs=state["epoch"], train_seconds=time.perf_counter() - started,
        eval_metrics={k[len("eval_"):]: v for k, v in final.items() if k.startswith("eval_")},
        examples_per_process=accelerator.gather(torch.tensor([examples_seen])).tolist(),
        history=state["history"],
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (ema.module if ema is not None else accelerator.unwrap_model(model)).save_pretrained(output_dir)
        if processor is not None:
            processor.save_pretrained(output_dir)
        plot_curves(state["history"], output_dir / CURVES_FILE, recipe.metric)
    accelerator.wait_for_everyone()  # the process group stays up: multi-stage runs call fit more than once
    return result


def _batch_size(batch) -> int:
    """Examples in a batch: the first dimension of its first tensor, however deeply the recipe nests them."""
    while isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return len(batch)


@torch.no_grad()
def evaluate(accelerator, model, eval_dl, recipe: Recipe) -> dict[str, float]:
    model.eval()
    gathered: dict[str, list[torch.Tensor]] = {}
    for batch in eval_dl:
        for key, value in recipe.eval_outputs(model, batch).items():
            gathered.setdefault(key, []).append(accelerator.gather_for_metrics(value))
    return recipe.compute_metrics({k: torch.cat(v) for k, v in gathered.items()})


def _log(accelerator, output_dir: Path, state: dict, record: dict) -> None:
    state["history"].append(record)
    if accelerator.is_main_process:
        with open(output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def _rewrite_metrics(output_dir: Path, history: list[dict]) -> None:
    # Lines logged after the checkpoint belong to the interrupted run; the resumed run logs them again.
    (output_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))


def _save_checkpoint(accelerator, output_dir: Path, state: dict, started: float, keep: int) -> None:
    checkpoint = output_dir / "checkpoints" / f"step-{state['global_step']:08d}"
    if (checkpoint / STATE_FILE).exists():  # the end-of-epoch save can coincide with a periodic one
        return
    accelerator.save_state(str(checkpoint))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state["train_seconds"] = time.perf_counter() - started
        tmp = checkpoint / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, checkpoint / STATE_FILE)
        for old in _complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists()) if root.is_dir() else []


def _find_checkpoint(output_dir: Path, resume_from: str) -> Path:
    if resume_from == "latest":
        complete = _complete_checkpoints(output_dir)
        if not complete:
            raise FileNotFoundError(f"no complete checkpoint under {output_dir / 'checkpoints'} to resume from")
        return complete[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                                f"complete ones: {[str(p) for p in _complete_checkpoints(output_dir)]}")
    return path


def plot_curves(history: list[dict], path: Path, metric: str) -> None:
    """Training loss per logged step and the eval metric per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["epoch"], r[f"eval_{metric}"]) for r in history if f"eval_{metric}" in r]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.5))
    if losses:
        ax_loss.plot(*zip(*losses))
    ax_loss.set(xlabel="optimiser step", ylabel="training loss", title="loss")
    if evals:
        ax_eval.plot(*zip(*evals), marker="o")
    ax_eval.set(xlabel="epoch", ylabel=f"eval {metric}", title=f"eval {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    override the recipe's `defaults` and its `preset_defaults` for `preset`.
    """
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from . import cards, data
    from .registry import get_method

    record = get_method(slug)
    preset = preset or record.default_preset
    record.preset(preset)  # an unknown preset fails before any data is built
    recipe_class = record.load(record.recipe)
    settings = {**recipe_class.defaults, **recipe_class.preset_defaults.get(preset, {}), **settings}
    recipe_fields = [f.name for f in fields(recipe_class)] if is_dataclass(recipe_class) else []
    unknown = set(settings) - set(TrainingArguments.field_names()) - set(recipe_fields)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; training arguments: {TrainingArguments.field_names()}; "
                        f"recipe fields: {recipe_fields}")
    recipe = recipe_class(**{k: v for k, v in settings.items() if k in recipe_fields})
    args = TrainingArguments(output_dir=output_dir, **{k: v for k, v in settings.items() if k not in recipe_fields})
    dataset = dataset or record.dataset
    if dataset_kwargs is None:
        dataset_kwargs = dict(record.dataset_kwargs) if dataset == record.dataset else {}
    columns = dict(columns or {})
    datasets = data.load(dataset, required=recipe.columns, columns=columns, seed=args.seed, **dataset_kwargs)
    set_seed(args.seed)  # the same initial weights for the same seed, resumed or not
    model, processor = recipe.build_model(slug, preset, datasets, dict(config_overrides or {}), args)
    result = fit(model, datasets, recipe, args, processor)
    if PartialState().is_main_process:
        run = {"method": slug, "preset": preset, "dataset": dataset, "dataset_kwargs": dataset_kwargs,
               "columns": columns, "training_arguments": asdict(args),
               "recipe": asdict(recipe) if is_dataclass(recipe) else {},
               "num_processes": PartialState().num_processes}
        Path(output_dir, RUN_FILE).write_text(json.dumps(run, indent=2))
        results = {"train_seconds": result.train_seconds, "global_step": result.global_step,
                   "epochs": result.epochs, "eval": result.eval_metrics,
                   "examples_per_process": result.examples_per_process,
                   "num_parameters": sum(p.numel() for p in model.parameters())}
        Path(output_dir, RESULTS_FILE).write_text(json.dumps(results, indent=2))
        cards.write_card(output_dir)
    return result


def _record_of_folder(folder: Path, run: dict):
    """The method of a saved folder: its config's model_type, else the run file of `train`."""
    from .registry import get_method, method_for_model_type

    config_file = folder / "config.json"
    if config_file.exists():
        return method_for_model_type(json.loads(config_file.read_text()).get("model_type"))
    if "method" in run:
        return get_method(run["method"])
    raise FileNotFoundError(f"{folder} has neither config.json nor {RUN_FILE}; expected a folder written by "
                            "save_pretrained or `hfpapers train`")


def evaluate_folder(folder: str, dataset: str | None = None) -> dict[str, float]:
    """Evaluate a saved model folder on the test split of the dataset it was trained on (or `dataset`).

    Writes eval_results.json next to the weights and returns the metrics.
    """
    from accelerate import Accelerator

    from . import data
    from .registry import load_pretrained

    folder_path = Path(folder)
    run_file = folder_path / RUN_FILE
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
