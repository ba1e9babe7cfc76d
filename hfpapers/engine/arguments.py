"""`TrainingArguments`: what the loop needs to know, checked for type and range when it is made."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields


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
    ema_start_epoch: int = 0  # the average starts from the weights of this epoch (before it, the model is evaluated)
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    checkpoint_every_steps: int | None = None  # besides the checkpoint at the end of every epoch
    keep_checkpoints: int = 2
    resume_from: str | None = None  # a checkpoint folder, or "latest" (the newest complete one in output_dir)
    overwrite_output_dir: bool = False  # train into a folder that holds an earlier run (its run files are removed)
    log_every_steps: int = 10
    progress_bar: bool = True
    report_to: str | list[str] = "none"  # accelerate trackers: "none", "all", "tensorboard", "wandb", ... or a list
    neural_collapse: bool = False  # record NC1-NC4 of the classifier's penultimate features on the eval set each epoch
    tract: float | None = None  # TrAct's lambda: train the first layer with TrAct's weight gradient (None: off)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            expected = [typing.get_origin(t) or t for t in typing.get_args(hints[f.name]) or (hints[f.name],)]
            if isinstance(value, int) and not isinstance(value, bool) and float in expected:
                value = float(value)  # `--set learning_rate=1` parses as an integer
                setattr(self, f.name, value)
            if isinstance(value, tuple) and list in expected:
                value = list(value)  # `--set report_to=[...]` parses as a tuple
                setattr(self, f.name, value)
            # bool is an int to Python, never to a user: `num_epochs=true` is a mistake.
            ok = any(isinstance(value, t) and not (isinstance(value, bool) and t is int) for t in expected)
            if isinstance(value, list):
                ok = ok and all(isinstance(v, str) for v in value)
            if not ok:
                names = " or ".join("None" if t is type(None) else t.__name__ for t in expected)
                raise TypeError(f"{f.name} must be {names}, got {value!r}")
        for name in ("num_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "keep_checkpoints", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be at least 1 (or None), got {self.checkpoint_every_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number above 0, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number of at least 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number above 0 (or None), got {self.max_grad_norm}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if not 0 <= self.ema_start_epoch < self.num_epochs:
            raise ValueError(f"ema_start_epoch must lie in [0, num_epochs={self.num_epochs}), got {self.ema_start_epoch}")
        if self.tract is not None and not (math.isfinite(self.tract) and self.tract > 0):
            raise ValueError(f"tract (TrAct's lambda) must be a finite number above 0 (or None), got {self.tract}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be one of no, bf16, fp16; got {self.mixed_precision!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def trackers(self) -> list[str]:
        """`report_to` as accelerate's `log_with` list (empty for "none")."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [] if names == ["none"] else names
