"""The hyper-parameters of GS-LoRA / GS-LoRA++ (no torch import: the package stays cheap to import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["GSLoRAConfig", "GROUP_TYPES"]

GROUP_TYPES = ("block", "lora", "matrix")
PER_TASK = ("beta", "prototype_forget_weight")  # settings the official script gives one value per task


@dataclass
class GSLoRAConfig:
    """Defaults are the official continual-forgetting script's single-valued settings (`scripts/run_cl_forget.sh`,
    face Transformer); the record's `face-casia100*` presets add what it sets per task.

    They were tuned for a CosFace head (logits in [-64, 64], so a cross-entropy of 105 is reachable); an ordinary
    linear head usually wants a smaller `bound`. The paper's hyper-parameters themselves are not published
    (the maintainers say the scripts' may differ from the tables'), so treat these as a starting point.
    `beta` and `prototype_forget_weight` take one value, or one per task (the official `--cl_beta_list` and
    `--cl_prof_list`).
    """

    # LoRA (peft). lora_alpha=1 gives loralib's default scaling alpha/r = 1/r, which the official code uses.
    rank: int = 8
    lora_alpha: float = 1.0
    target_modules: tuple[str, ...] | None = None  # None: both FFN Linear layers of every block, found by shape
    tune: str = "lora"  # lora | full (every weight trainable: the full fine-tuning baseline, no adapter)
    # L_structure: group-sparse penalty, weight alpha, zero for the first `alpha_warmup_epochs` epochs.
    alpha: float = 1e-4
    alpha_warmup_epochs: int = 0
    group_type: str = "block"  # block (4 LoRA matrices per block) | lora (A and B of one layer) | matrix
    # L_forget = beta * ReLU(BND - CE) on the classes being forgotten.
    beta: float | tuple[float, ...] = 0.15
    bound: float = 105.0
    # GS-LoRA++: KL to the frozen model's class-mean embeddings; forgotten classes pushed away up to
    # `prototype_bound`, retained ones pulled towards theirs.
    prototypes: bool = False
    prototype_forget_weight: float | tuple[float, ...] = 0.01
    prototype_retain_weight: float = 0.0
    prototype_bound: float = 50.0
    # Few-shot mode: keep only this many examples per class of the forget and retain data (seeded).
    few_shot: int | None = None
    # Optimisation (timm AdamW, weight decay 0.05, cosine schedule in the official code).
    num_epochs: int = 100
    learning_rate: float = 1e-2
    weight_decay: float = 0.05
    batch_size: int = 48
    lr_scheduler: str = "cosine"
    # An exponential moving average of the trainable weights from epoch `ema_start_epoch` on; when set, the average
    # is what is merged.
    ema_decay: float | None = None
    ema_start_epoch: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        for name in PER_TASK:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ValueError(f"{name} needs one value, or one per task; got an empty list")
                setattr(self, name, tuple(value))
        checks = {
            "rank": self.rank >= 1, "num_epochs": self.num_epochs >= 1, "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0, "lora_alpha": self.lora_alpha > 0,
            "alpha": self.alpha >= 0, "beta": min(self._values("beta")) >= 0, "bound": self.bound >= 0,
            "alpha_warmup_epochs": self.alpha_warmup_epochs >= 0, "weight_decay": self.weight_decay >= 0,
            "prototype_forget_weight": min(self._values("prototype_forget_weight")) >= 0,
            "prototype_retain_weight": self.prototype_retain_weight >= 0, "prototype_bound": self.prototype_bound >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"GSLoRAConfig: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of range "
                             "(ranks, epochs, batch sizes and learning rates are positive; weights and bounds >= 0)")
        if self.group_type not in GROUP_TYPES:
            raise ValueError(f"group_type must be one of {', '.join(GROUP_TYPES)}; got {self.group_type!r}")
        if self.tune not in ("lora", "full"):
            raise ValueError(f"tune must be 'lora' or 'full'; got {self.tune!r}")
        if self.tune == "full" and self.alpha > 0:
            raise ValueError("tune='full' has no LoRA groups to make sparse: set alpha=0")
        if self.few_shot is not None and self.few_shot < 1:
            raise ValueError(f"few_shot must be at least 1 example per class, got {self.few_shot}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if not 0 <= self.ema_start_epoch < self.num_epochs:
            raise ValueError(f"ema_start_epoch must lie in [0, num_epochs={self.num_epochs}), got {self.ema_start_epoch}")

    def _values(self, name: str) -> tuple[float, ...]:
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,)

    def for_task(self, task: int) -> "GSLoRAConfig":
        """The settings of task `task` (1, 2, ...): per-task values picked, one value kept for every task."""
        picked = {}
        for name in PER_TASK:
            values = self._values(name)
            if isinstance(getattr(self, name), tuple):
                if task > len(values):
                    raise ValueError(f"{name} gives {len(values)} per-task values {values}; task {task} has none "
                                     "(give one value per task, or a single value for all)")
                picked[name] = values[task - 1]
        return replace(self, **picked)

    def to_dict(self) -> dict:
        return asdict(self)
