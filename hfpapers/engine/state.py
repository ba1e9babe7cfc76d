"""What the loop knows while it trains (`TrainingState`) and the hooks it calls (`Callback`).

The state is handed to the recipe's loss and to every callback; the part that is not a module is saved in each
checkpoint (`to_dict` / `from_dict`), so a resumed run continues with the same counters and history.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class TrainingState:
    """Counters of a run. `epoch` is the number of finished epochs, which is also the 0-based index of the epoch
    being trained; `batches_done` counts the micro-batches of that epoch, `global_step` the optimiser steps."""

    num_epochs: int = 1
    steps_per_epoch: int = 0  # optimiser steps per epoch
    epoch: int = 0
    global_step: int = 0
    batches_done: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # every record written to metrics.jsonl
    ema_model: torch.nn.Module | None = field(default=None, repr=False)  # the weight average, when ema_decay is set
    # The prepared (sharded) eval dataloader, for callbacks that measure the model on it; not saved.
    eval_dataloader: object | None = field(default=None, repr=False)

    @property
    def max_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("ema_model", "eval_dataloader")}

    @classmethod
    def from_dict(cls, values: dict, ema_model: torch.nn.Module | None = None) -> "TrainingState":
        return cls(**values, ema_model=ema_model)


class Callback:
    """Hooks into `fit`, in the manner of transformers' `TrainerCallback`; override the ones you need.

    `model` is the model as the loop trains it (wrapped for distributed training), `accelerator` the run's
    `Accelerator`. Every process calls every hook; guard writes with `accelerator.is_main_process`.
    """

    def on_train_begin(self, state: TrainingState, model, accelerator) -> None:
        """Before the first step (after a resume has restored `state`)."""

    def on_before_optimizer_step(self, state: TrainingState, model, accelerator) -> None:
        """The accumulated gradients are in `param.grad` (synchronised across processes, not yet clipped): change
        them here; clipping and the optimiser step see what this leaves."""

    def on_step_end(self, state: TrainingState, model, batch: dict, accelerator) -> None:
        """After an optimiser step; `batch` is its last micro-batch and `state.global_step` counts this step."""

    def on_evaluate(self, state: TrainingState, model, metrics: dict[str, float], accelerator) -> None:
        """After each epoch's evaluation; keys added to `metrics` are logged with it (as eval_<key>)."""

    def on_epoch_end(self, state: TrainingState, model, accelerator) -> None:
        """After an epoch and its evaluation, before its checkpoint; `state.epoch` counts this epoch."""

    def on_train_end(self, state: TrainingState, model, accelerator) -> None:
        """After the last epoch, before the final weights are saved."""


def process_state():
    """This run's processes (accelerate's `PartialState`). On a machine without an accelerator `cpu=True` is what
    makes `accelerate launch` processes one gloo group; the first `PartialState` made fixes that for the whole run,
    so every entry point asks for it here first."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())
