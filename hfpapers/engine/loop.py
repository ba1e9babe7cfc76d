"""The one Accelerate training loop (`fit`) and its evaluation (`evaluate`).

Gradient accumulation, mixed precision, evaluation each epoch, pickle-free checkpoints with exact resume, a
progress bar, metrics as JSON lines (and accelerate trackers), callbacks, a stop at the first non-finite loss.
The same code runs under `python`, `hfpapers train` and `accelerate launch` (any number of processes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch

from . import run_folder as rf
from .arguments import TrainingArguments
from .recipe import Recipe
from .state import Callback, TrainingState, process_state


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN / inf loss or weights; nothing after the last good checkpoint was saved."""


@dataclass
class FitResult:
    global_step: int
    epochs: int
    train_seconds: float
    eval_metrics: dict[str, float]
    examples_per_process: list[int]  # training examples each process stepped through (this run, after resume)
    history: list[dict] = field(default_factory=list)
    ema_model: torch.nn.Module | None = None  # the weight average (what was evaluated and saved), when ema_decay is set


def progress_bar(iterable=None, *, total: int | None = None, desc: str | None = None, enabled: bool = True, **kwargs):
    """The tqdm bar of every long step (training, warm-up stages, dataset building, a procedure's tasks).

    Shown on the local main process only, and not where Hugging Face progress bars are off:
    `HF_HUB_DISABLE_PROGRESS_BARS=1`, `huggingface_hub.utils.disable_progress_bars()` (or of the group "hfpapers"
    alone), transformers' `logging.disable_progress_bar()`.
    """
    from huggingface_hub.utils import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, name="hfpapers",
                disable=not (enabled and process_state().is_local_main_process), **kwargs)


def _accelerator(args: TrainingArguments, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import DataLoaderConfiguration, LoggerType, ProjectConfiguration

    # accelerate drops a built-in tracker whose package is missing without a word; say so instead.
    available = [str(t) for t in get_available_trackers()]
    built_in = {str(t) for t in LoggerType} - {"all"}
    missing = [name for name in args.trackers if name in built_in and name not in available]
    if missing:
        raise ValueError(f"report_to={missing} needs its package installed (pip install {' '.join(missing)}); "
                         f"trackers available here: {available or 'none'}")
    return Accelerator(
        # On a machine without an accelerator, `cpu=True` is what lets `accelerate launch` processes form a
        # gloo group (MULTI_CPU); without it each would train alone.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # A seeded sampler makes each epoch's order a function of (seed, epoch): resume replays it exactly.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=args.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / rf.LOGS_DIR)),
    )


def fit(model, datasets, recipe: Recipe, args: TrainingArguments, processor=None,
        callbacks: list[Callback] | None = None, run: dict | None = None, desc: str = "train") -> FitResult:
    """Train `model` on `datasets` ("train"/"test") with `recipe`; checkpoints and metrics go to args.output_dir.

    `callbacks` run before the recipe's own (`recipe.callbacks()`). `run` describes the run beyond its arguments
    (method, preset, dataset, ...): it is saved in every checkpoint, and a resume whose description or
    arguments differ is refused. `desc` names the run on its progress bar.
    """
    from accelerate.utils import set_seed

    output_dir = Path(args.output_dir)
    callbacks = [*(callbacks or []), *recipe.callbacks()]
    if args.neural_collapse:
        from ..analysis.neural_collapse import NeuralCollapseCallback

        callbacks.append(NeuralCollapseCallback())
    if args.tract is not None:
        from ..registry import get_method

        callbacks.append(get_method("tract").load("hfpapers.methods.tract.tract.TrActCallback")(args.tract))
    accelerator = _accelerator(args, output_dir)
    set_seed(args.seed)
    train_set, eval_set = (recipe.prepare_dataset(datasets[split], processor) for split in ("train", "test"))
    train_dl = torch.utils.data.DataLoader(
        train_set, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=recipe.collate,
        drop_last=True,
    )
    eval_dl = torch.utils.data.DataLoader(eval_set, batch_size=args.per_device_eval_batch_size,
                                          collate_fn=recipe.collate)
    if len(train_dl) // accelerator.num_processes < args.gradient_accumulation_steps:
        raise ValueError(
            f"{len(train_set)} training examples make fewer than gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} batches of {args.per_device_train_batch_size} per process"
        )
    optimizer = recipe.build_optimizer(model, args)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    state = TrainingState(num_epochs=args.num_epochs, steps_per_epoch=len(train_dl) // args.gradient_accumulation_steps)
    # Stepped by hand once per optimiser step (accelerate's wrapper would step it once per process).
    scheduler = recipe.build_scheduler(optimizer, args, state.max_steps, state.steps_per_epoch)
    ema = None
    if args.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay),
                            use_buffers=True)
        state.ema_model = ema.module
    # What the run is: a resume must match it (arguments that only change reporting may differ).
    run = {**(run or {}), "num_processes": accelerator.num_processes, "steps_per_epoch": state.steps_per_epoch,
           "training_arguments": {k: v for k, v in asdict(args).items() if k not in rf.RESUMABLE_ARGUMENTS},
           "recipe": asdict(recipe) if is_dataclass(recipe) else {}}

    if args.resume_from:
        checkpoint = rf.find_checkpoint(output_dir, args.resume_from)
        values, saved_run = rf.read_checkpoint_state(checkpoint)
        rf.check_same_run(checkpoint, saved_run, run)
        rf.load_checkpoint_into(accelerator, checkpoint, model, optimizer, scheduler, ema)
        state = TrainingState.from_dict(values, ema_model=state.ema_model)
        if accelerator.is_main_process:
            rf.rewrite_metrics(output_dir, state.history)
        accelerator.print(f"resumed from {checkpoint} (epoch {state.epoch}, step {state.global_step})")
    else:
        entries = rf.previous_run_entries(output_dir)
        if entries and not args.overwrite_output_dir:
            rf.refuse_used_folder(output_dir, entries)
        accelerator.wait_for_everyone()  # every process has looked before the main one deletes or writes
        if accelerator.is_main_process:
            if entries:
                rf.clear_previous_run(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            with rf.writing(output_dir / rf.METRICS_FILE):
                (output_dir / rf.METRICS_FILE).write_text("")
        accelerator.wait_for_everyone()
    state.eval_dataloader = eval_dl
    if args.trackers:
        accelerator.init_trackers("hfpapers", config={k: v for k, v in asdict(args).items()
                                                      if isinstance(v, (int, float, str, bool))})

    def save_checkpoint() -> None:
        checkpoint = rf.checkpoint_folder(output_dir, state.global_step)
        if (checkpoint / rf.STATE_FILE).exists():  # the end-of-epoch save can coincide with a periodic one
            return
        _check_finite_weights(accelerator, model, ema, state, output_dir)
        state.train_seconds = time.perf_counter() - started
        rf.save_checkpoint(accelerator, checkpoint, model, optimizer, scheduler, ema, state, run)
        if accelerator.is_main_process:
            rf.prune_checkpoints(output_dir, args.keep_checkpoints)
        accelerator.wait_for_everyone()

    progress = progress_bar(total=state.max_steps, initial=state.global_step, desc=desc, enabled=args.progress_bar)
    started = time.perf_counter() - state.train_seconds
    examples_seen = 0
    try:
        for callback in callbacks:
            callback.on_train_begin(state, model, accelerator)
        model.train()
        for epoch in range(state.epoch, args.num_epochs):
            train_dl.set_epoch(epoch)
            batches = accelerator.skip_first_batches(train_dl, state.batches_done) if state.batches_done else train_dl
            for batch in batches:
                micro_step = epoch * len(train_dl) + state.batches_done
                step_rng = torch.Generator().manual_seed(
                    (args.seed * 1_000_003 + accelerator.process_index) * 1_000_003 + micro_step)
                with accelerator.accumulate(model):
                    loss = recipe.backward(accelerator, model, batch, step_rng, state)
                    _check_finite_loss(accelerator, loss, state, output_dir)
                    if accelerator.sync_gradients:
                        for callback in callbacks:
                            callback.on_before_optimizer_step(state, model, accelerator)
                        if args.max_grad_norm is not None:
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                state.batches_done += 1
                examples_seen += _batch_size(batch)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                if ema is not None and epoch >= args.ema_start_epoch:
                    ema.update_parameters(accelerator.unwrap_model(model))
                state.global_step += 1
                progress.update(1)
                for callback in callbacks:
                    callback.on_step_end(state, model, batch, accelerator)
                step = state.global_step
                if step % args.log_every_steps == 0 or step == state.max_steps:
                    record = {"step": step, "epoch": epoch + state.batches_done / len(train_dl),
                              "loss": accelerator.reduce(loss, "mean").item(), "lr": scheduler.get_last_lr()[0]}
                    rf.log_record(accelerator, output_dir, state, record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                if args.checkpoint_every_steps and step % args.checkpoint_every_steps == 0:
                    save_checkpoint()
            metrics = evaluate(accelerator, _averaged_or(model, ema), eval_dl, recipe)
            model.train()
            state.epoch, state.batches_done = epoch + 1, 0
            for callback in callbacks:
                callback.on_evaluate(state, model, metrics, accelerator)
            rf.log_record(accelerator, output_dir, state, {"step": state.global_step, "epoch": epoch + 1,
                                                          **{f"eval_{k}": v for k, v in metrics.items()}})
            accelerator.print(f"epoch {epoch + 1}/{args.num_epochs}: "
                              + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            for callback in callbacks:
                callback.on_epoch_end(state, model, accelerator)
            save_checkpoint()
        for callback in callbacks:
            callback.on_train_end(state, model, accelerator)
    finally:
        progress.close()
        # What `accelerator.end_training()` does, less destroying the process group: multi-stage runs call fit
        # more than once in the same processes.
        for tracker in accelerator.trackers:
            tracker.finish()

    final = next((r for r in reversed(state.history) if any(k.startswith("eval_") for k in r)), {})
    result = FitResult(
        global_step=state.global_step, epochs=state.epoch, train_seconds=time.perf_counter() - started,
        eval_metrics={k[len("eval_"):]: v for k, v in final.items() if k.startswith("eval_")},
        examples_per_process=accelerator.gather(torch.tensor([examples_seen])).tolist(),
        history=state.history, ema_model=state.ema_model,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with rf.writing(output_dir):
            _averaged_or(accelerator.unwrap_model(model), ema).save_pretrained(output_dir)
            if processor is not None:
                processor.save_pretrained(output_dir)
        rf.plot_curves(state.history, output_dir / rf.CURVES_FILE, recipe.metric)
    accelerator.wait_for_everyone()  # the process group stays up: multi-stage runs call fit more than once
    return result


def _last_good_checkpoint(output_dir: Path) -> str:
    complete = rf.complete_checkpoints(output_dir)
    return f"the last good checkpoint is {complete[-1]}" if complete else "no checkpoint was saved yet"


def _check_finite_loss(accelerator, loss: torch.Tensor, state: TrainingState, output_dir: Path) -> None:
    # Every process must stop together, or the others would wait for it forever in the next collective.
    bad = accelerator.reduce((~torch.isfinite(loss.detach().float())).any().float().reshape(1), "sum").item()
    if bad:
        raise NonFiniteLossError(
            f"the loss is {loss.item()} at epoch {state.epoch + 1}, optimiser step {state.global_step + 1}: "
            f"training stopped before that step (learning rate too high?); {_last_good_checkpoint(output_dir)}")


def _averaged_or(model, ema):
    """The weight average once it has started (`ema_start_epoch`), else the model itself."""
    return ema.module if ema is not None and ema.n_averaged > 0 else model


def _check_finite_weights(accelerator, model, ema, state: TrainingState, output_dir: Path) -> None:
    """A checkpoint is only written from finite weights, so that the last one saved is always usable."""
    modules = [model] + ([ema] if ema is not None else [])
    bad = sum(not torch.isfinite(p).all() for m in modules for p in m.parameters())
    if accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), "sum").item():
        raise NonFiniteLossError(f"the weights are not finite after optimiser step {state.global_step}; "
                                 f"training stopped without saving them; {_last_good_checkpoint(output_dir)}")


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
