"""`hfpapers run tract`: train an image classifier with TrAct on its first layer, next to the same training
without it.

    hfpapers run tract --model path/or/hub-id --output-dir out/ --set l=0.1 --set num_epochs=20
    accelerate launch --multi_gpu --num_processes 2 -m hfpapers run tract --model ... (the same, on 2 processes)

The model's architecture (from a fresh initialisation, or its weights with `from_scratch=false`) trains on the
dataset's "train" split with TrAct and, with `baseline=true`, once more without it from the same initial weights
and data order; both are evaluated on the "test" split after every epoch. The TrAct model is saved (plain: TrAct
changes training only), with the accuracy curves (accuracy.png) and the epochs TrAct needed to reach the
baseline's final accuracy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...runs import RunResult, Runner, Table
from .config import TractConfig

__all__ = ["TractRunner", "accuracy_curve", "epochs_to_reach", "plot_accuracy"]

ARMS = ("TrAct", "baseline")


def accuracy_curve(history: list[dict]) -> list[float]:
    """The test accuracy after each epoch, from a run's metrics history."""
    return [r["eval_accuracy"] for r in history if "eval_accuracy" in r]


def epochs_to_reach(curve: list[float], target: float) -> int | None:
    """The first epoch (1-based) whose accuracy is at least `target`; None when none is."""
    return next((epoch for epoch, value in enumerate(curve, start=1) if value >= target), None)


def plot_accuracy(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """Test accuracy per epoch of each arm (mean over seeds, the seeds' range shaded): the paper's Fig. 1 axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, runs in curves.items():
        values = np.asarray(runs, dtype=float)
        epochs = np.arange(1, values.shape[1] + 1)
        ax.plot(epochs, values.mean(0), marker="o", markersize=3, label=name)
        if len(values) > 1:
            ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_arm(model, processor, datasets, config: TractConfig, output_dir: Path, tract: bool,
              progress_bar: bool = True) -> list[dict]:
    """One arm through the engine: `model` trained in place with (or without) TrAct; returns its history."""
    from ...engine import TrainingArguments, fit
    from .recipe import TrActRecipe
    from .tract import TrActCallback

    args = TrainingArguments(
        output_dir=str(output_dir), num_epochs=config.num_epochs, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, lr_scheduler=config.lr_scheduler,
        seed=config.seed, overwrite_output_dir=True, keep_checkpoints=1, progress_bar=progress_bar)
    callbacks = [TrActCallback(config.l, config.layer)] if tract else []
    recipe = TrActRecipe(optimizer=config.optimizer, momentum=config.momentum)
    result = fit(model, datasets, recipe, args, processor, callbacks=callbacks,
                 desc="TrAct" if tract else "baseline")
    return result.history


class TractRunner(Runner):
    """Trains `--model` with TrAct (and the baseline beside it), then saves the TrAct model and the curves."""

    config_class = TractConfig

    def run(self, config: TractConfig, model: str, datasets, output_dir: Path, **options) -> RunResult:
        import torch
        from accelerate import PartialState
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from ...registry import register_with_transformers
        from .recipe import TrActRecipe
        from .tract import apply_tract, remove_tract

        register_with_transformers()
        processor = AutoImageProcessor.from_pretrained(model)
        given = AutoModelForImageClassification.from_pretrained(model, use_safetensors=True)
        TrActRecipe().check_eval_dataset(given, datasets["test"])
        layer = apply_tract(given, config.l, config.layer)  # an unsupported first layer is refused here
        remove_tract(given)
        if config.from_scratch:
            torch.manual_seed(config.seed)
            given = AutoModelForImageClassification.from_config(given.config)
        initial = {k: v.clone() for k, v in given.state_dict().items()}
        curves, models = {}, {}
        for arm in ARMS if config.baseline else ARMS[:1]:
            arm_model = AutoModelForImageClassification.from_config(given.config)
            arm_model.load_state_dict(initial)
            history = train_arm(arm_model, processor, datasets, config, output_dir / "runs" / arm, arm == "TrAct")
            curves[arm], models[arm] = accuracy_curve(history), arm_model
        state = PartialState()
        if state.is_main_process:
            for arm in curves:  # the runs' checkpoints are only a cache: the curves are kept, the model saved
                shutil.rmtree(output_dir / "runs" / arm / "checkpoints", ignore_errors=True)
            models["TrAct"].save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
            plot_accuracy({arm: [c] for arm, c in curves.items()}, output_dir / "accuracy.png",
                          f"TrAct (l={config.l}) on {layer}")
        state.wait_for_everyone()
        return self.result(config, model, layer, curves)

    @staticmethod
    def result(config: TractConfig, model: str, layer: str, curves: dict[str, list[float]]) -> RunResult:
        tract = curves["TrAct"]
        metrics = {"accuracy": tract[-1]}
        rows = [[epoch, f"{tract[epoch - 1]:.4f}"] for epoch in range(1, len(tract) + 1)]
        columns = ["epoch", "TrAct accuracy"]
        if "baseline" in curves:
            base = curves["baseline"]
            reached = epochs_to_reach(tract, base[-1])
            metrics |= {"baseline_accuracy": base[-1]}
            if reached is not None:
                metrics["epochs_to_baseline"] = float(reached)
            rows = [row + [f"{b:.4f}"] for row, b in zip(rows, base)]
            columns.append("baseline accuracy")
        start = "A fresh initialisation of" if config.from_scratch else "The weights of"
        base_note = (f" The baseline's final accuracy {base[-1]:.4f} was reached by TrAct "
                     + (f"after {reached} of {len(base)} epochs." if reached else "in no epoch.")) \
            if "baseline" in curves else ""
        return RunResult(
            summary=(f"{start} {model} trained for {config.num_epochs} epochs with TrAct (l = {config.l}) on its "
                     f"first layer `{layer}`" + (", and the same training without TrAct" if config.baseline else "")
                     + f". Final test accuracy {tract[-1]:.4f}." + base_note),
            metrics=metrics,
            tables=[Table("Test accuracy after each epoch, measured here", columns, rows,
                          "Both arms start from the same weights and see the same batches; only the first layer's "
                          "weight gradient differs (TrAct's closed form, Eq. 10). accuracy.png plots the curves.")],
            usage=("```python\nfrom transformers import pipeline\n\nclassifier = pipeline(\"image-classification\", "
                   "model=REPO)\n```\n\nTrAct changes how the first layer trains, not the model: this is a plain "
                   "checkpoint of the architecture it was given."),
            details={"layer": layer, "curves": curves})
