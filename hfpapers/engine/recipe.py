"""The recipe base: how a method trains (data, model, loss, optimiser, metrics), for the loop in `loop.py`."""

from __future__ import annotations

from abc import ABC, abstractmethod
import torch

from .arguments import TrainingArguments
from .state import Callback, TrainingState


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

    Subclasses live in `methods/<slug>/recipe.py`; the training arguments a method trains with belong to its
    record's presets (`Preset.training`), not to the recipe. `step_rng` passed to `compute_loss` is seeded from (seed, process, micro-step), so random augmentation
    reproduces exactly on resume. `state` (a `TrainingState`: epoch, num_epochs, global_step, ema_model, ...)
    is what a loss that changes over training reads.
    """

    metric: str = "accuracy"  # the headline eval metric (for the card and the zoo index)
    columns: tuple[str, ...] = ()  # the dataset columns `prepare_dataset` reads
    processor_class: str = "AutoProcessor"  # the transformers Auto class that reloads the saved processor

    def build_model(self, preset, datasets, args: TrainingArguments):
        """The model to train and its processor (None for none), for `datasets` ("train"/"test").

        `preset` is the `hfpapers.registry.ResolvedPreset` the engine resolved (config values with the user's
        overrides, and the classes that build them)."""
        model = preset.new_model()
        return model, preset.new_processor(model.config)

    def build_scheduler(self, optimizer, args: TrainingArguments, total_steps: int, steps_per_epoch: int):
        """The learning-rate schedule, stepped once per optimiser step."""
        from transformers import get_scheduler

        return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                             num_training_steps=total_steps)

    def callbacks(self) -> list[Callback]:
        """Callbacks the method itself needs, run after the ones passed to `fit`."""
        return []

    @abstractmethod
    def prepare_dataset(self, dataset, processor) -> torch.utils.data.Dataset:
        """One split of a `datasets.Dataset` as a torch dataset whose items `collate` batches."""

    def check_arguments(self, args: TrainingArguments) -> None:
        """Raise when the recipe cannot train with `args` (e.g. a schedule longer than the run); called before any
        data is built."""

    def check_eval_dataset(self, model, dataset) -> None:
        """Raise when a dataset cannot evaluate `model` (e.g. other labels); called by `evaluate_folder`."""

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate(examples)

    def build_optimizer(self, model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def compute_loss(self, model, batch: dict, step_rng: torch.Generator, state: TrainingState) -> torch.Tensor:
        return model(**batch).loss

    def backward(self, accelerator, model, batch: dict, step_rng: torch.Generator,
                 state: TrainingState) -> torch.Tensor:
        """One micro-batch's gradients; returns its loss (for logging). Override for losses that need their
        own backward schedule (e.g. a gradient cache)."""
        loss = self.compute_loss(model, batch, step_rng, state)
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

    def build_model(self, preset, datasets, args: TrainingArguments):
        names = datasets["train"].features["label"].names
        model = preset.new_model(num_labels=len(names), id2label=dict(enumerate(names)),
                                 label2id={n: i for i, n in enumerate(names)})
        return model, preset.new_processor(model.config)

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
