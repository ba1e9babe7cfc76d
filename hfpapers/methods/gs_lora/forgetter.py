"""The continual-forgetting protocol of GS-LoRA / GS-LoRA++ on any transformers image classifier.

Per task (official `train/train_own_forget_cl.py`): a fresh LoRA adapter on the FFN Linear layers, trained with
the paper's losses on the forget data and a small replay set of retained classes, then merged into the weights
(loralib merges on `eval()`), so the next task starts from the merged model with a new adapter.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from ...engine import process_state

from .adapters import block_norms, find_ffn_targets, lora_config, lora_groups, stack_adapters
from .config import GSLoRAConfig
from .losses import class_prototypes
from .metrics import forgetting_metrics
from .recipe import EmbeddingTap, EvalSet, GSLoRARecipe, PairedReplay

__all__ = ["ContinualForgetter", "ForgettingReport", "task_data"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ForgettingReport:
    """What one task did, measured on the evaluation set before and after (accuracies as fractions)."""

    task: int
    forget_classes: list[str]
    acc_f_before: float
    acc_r_before: float
    acc_f: float
    acc_r: float
    acc_o: float | None  # classes forgotten in earlier tasks; None in the first task
    drop: float
    h_mean: float
    block_norms: list[float] = field(default_factory=list)  # per block, sum of its LoRA matrices' norms
    train_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _hub_id(name: str) -> str | None:
    """`name` when it reads as a Hub repo id (what a card's base_model may name), else None."""
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name or "") and not Path(name).exists() else None


def task_data(dataset, forget_classes, forgotten_before=()):
    """Split a labelled `datasets.Dataset` for one task: (examples of `forget_classes`, examples of every class
    neither forgotten now nor in an earlier task)."""
    forget, earlier = set(forget_classes), set(forgotten_before)
    labels = dataset["label"]
    return (dataset.select([i for i, y in enumerate(labels) if y in forget]),
            dataset.select([i for i, y in enumerate(labels) if y not in forget and y not in earlier]))


class ContinualForgetter:
    """Forgets classes of an image classifier task after task, each task with its own merged LoRA adapter.

    model: a transformers image classifier instance (modified in place), a local folder or a Hub id.
    processor: the image processor for `image` columns (loaded with the model when it is given by name).
    eval_data: a labelled dataset over all classes on which every report is measured (default: the task's own
    forget and retain data plus earlier tasks' forget data).
    output_dir: where each task's engine run (checkpoints, metrics.jsonl, adapter) goes (default: a temp folder).
    """

    def __init__(self, model, config: GSLoRAConfig | None = None, processor=None, eval_data=None,
                 output_dir: str | None = None):
        self.config = config or GSLoRAConfig()
        if isinstance(model, (str, Path)):
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            processor = processor or AutoImageProcessor.from_pretrained(str(model))
            model = AutoModelForImageClassification.from_pretrained(str(model))
        self.base_model = model.name_or_path
        self.processor = processor
        self.targets = find_ffn_targets(model, self.config.target_modules) if self.config.tune == "lora" else None
        self.model = model.to(process_state().device)
        self._requires_grad = [p.requires_grad for p in model.parameters()]
        self.id2label = {int(i): name for i, name in model.config.id2label.items()}
        self.eval_set = self._encode(eval_data, "eval_data") if eval_data is not None else None
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="gs-lora-"))
        self.tasks: list[dict] = []  # per task: classes, its run folder, its forget data (for Acc_o)
        self.reports: list[ForgettingReport] = []

    @property
    def forgotten(self) -> list[int]:
        return [c for task in self.tasks for c in task["classes"]]

    # ---------------------------------------------------------------- validation and data

    def class_ids(self, classes) -> list[int]:
        label2id = {name: i for i, name in self.id2label.items()}
        ids = []
        for c in classes:
            if isinstance(c, str) and c in label2id:
                ids.append(label2id[c])
            elif isinstance(c, int) and not isinstance(c, bool) and c in self.id2label:
                ids.append(c)
            else:
                raise ValueError(f"cannot forget class {c!r}: the model has no such class; its "
                                 f"{len(self.id2label)} classes are {list(self.id2label.items())}")
        if not ids:
            raise ValueError("forget_classes is empty: name at least one class to forget")
        again = sorted(set(ids) & set(self.forgotten))
        if again:
            raise ValueError(f"classes {[self.id2label[c] for c in again]} were already forgotten in an earlier task")
        return sorted(set(ids))

    def _encode(self, data, what: str) -> dict[str, torch.Tensor]:
        """A labelled `datasets.Dataset` ("image" or "pixel_values", and "label") as tensors."""
        if len(data) == 0:
            raise ValueError(f"{what} is empty")
        label_key = next((k for k in ("label", "labels") if k in data.column_names), None)
        if label_key is None:
            raise ValueError(f"{what} has no 'label' column; columns: {data.column_names}")
        labels = torch.as_tensor(list(data[label_key]))
        bad = sorted(set(labels.tolist()) - set(self.id2label))
        if bad:
            raise ValueError(f"{what} has labels {bad} that are not classes of the model (0..{len(self.id2label) - 1})")
        if "pixel_values" in data.column_names:
            pixels = torch.as_tensor(data.with_format("numpy")["pixel_values"])
        elif "image" in data.column_names:
            if self.processor is None:
                raise ValueError(f"{what} has images but the forgetter has no image processor: pass processor=...")
            pixels = self.processor(list(data["image"]), return_tensors="pt")["pixel_values"]
        else:
            raise ValueError(f"{what} needs an 'image' or a 'pixel_values' column; columns: {data.column_names}")
        return {"pixel_values": pixels.float(), "labels": labels}

    def _few_shot(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """At most `few_shot` examples per class, drawn with the config's seed."""
        generator = torch.Generator().manual_seed(self.config.seed)
        order = torch.randperm(len(data["labels"]), generator=generator)
        labels = data["labels"][order]
        keep = torch.cat([order[labels == c][: self.config.few_shot] for c in labels.unique()]).sort().values
        return {k: v[keep] for k, v in data.items()}

    def _check_task(self, classes: list[int], forget: dict, retain: dict) -> None:
        forget_labels, retain_labels = set(forget["labels"].tolist()), set(retain["labels"].tolist())
        stray = sorted(forget_labels - set(classes))
        if stray:
            raise ValueError(f"forget_data has examples of classes {[self.id2label[c] for c in stray]} that are "
                             f"not being forgotten ({[self.id2label[c] for c in classes]})")
        missing = sorted(set(classes) - forget_labels)
        if missing:
            raise ValueError(f"forget_data has no examples of classes {[self.id2label[c] for c in missing]}")
        overlap = sorted(retain_labels & set(classes))
        if overlap:
            raise ValueError(f"forget and retain classes overlap: retain_data has examples of "
                             f"{[self.id2label[c] for c in overlap]}, which this task forgets")
        earlier = sorted(retain_labels & set(self.forgotten))
        if earlier:
            raise ValueError(f"retain_data has examples of {[self.id2label[c] for c in earlier]}, forgotten in an "
                             "earlier task")
        batch = self.config.batch_size
        if len(retain["labels"]) < batch * PartialState().num_processes:
            raise ValueError(f"retain_data has {len(retain['labels'])} examples (after few-shot selection), fewer "
                             f"than one batch of {batch} per process: lower GSLoRAConfig.batch_size")

    # ---------------------------------------------------------------- model pieces

    def _head_name(self) -> str:
        """The classifier whose input is the embedding GS-LoRA++ takes class means of."""
        num_labels = len(self.id2label)
        heads = [n for n, m in self.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
        if len(heads) != 1:
            raise ValueError(f"GS-LoRA++ prototypes need the embedding that enters the classifier; found "
                             f"{len(heads)} Linear layers with {num_labels} outputs ({heads}) instead of one")
        return heads[0]

    @torch.no_grad()
    def _predict(self, model, data: dict, tap: EmbeddingTap | None = None, batch_size: int = 256):
        """Predictions (and the tapped embeddings) of `model` in eval mode."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        predictions, embeddings = [], []
        for start in range(0, len(data["labels"]), batch_size):
            logits = model(pixel_values=data["pixel_values"][start:start + batch_size].to(device)).logits
            predictions.append(logits.argmax(-1).cpu())
            if tap is not None:
                embeddings.append(tap.embeddings.float().cpu())
        model.train(was_training)
        return torch.cat(predictions), (torch.cat(embeddings) if tap is not None else None)

    def predict(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, labels) of the current model on a labelled dataset."""
        encoded = self._encode(data, "data")
        return self._predict(self.model, encoded)[0], encoded["labels"]

    def _accuracies(self, predictions, labels, classes: list[int]) -> tuple[float, float]:
        m = forgetting_metrics(predictions.tolist(), labels.tolist(), classes, self.forgotten)
        return m["acc_f"], m["acc_r"]

    def _attach_adapter(self):
        """A fresh LoRA on the FFN layers (everything else frozen), or every weight trainable for 'full'."""
        if self.config.tune == "full":
            for p in self.model.parameters():
                p.requires_grad_(True)
            return self.model
        from peft import get_peft_model

        torch.manual_seed(self.config.seed + len(self.tasks))
        model = get_peft_model(self.model, lora_config(self.targets, self.config.rank, self.config.lora_alpha))
        if self.tasks:
            # Between tasks the official code re-initialises A with kaiming-uniform(a=sqrt(50)), not loralib's sqrt(5).
            for group in lora_groups(model, self.targets, "lora"):
                torch.nn.init.kaiming_uniform_(group[0], a=math.sqrt(50))
        return model

    def _detach_adapter(self, model):
        merged = model if self.config.tune == "full" else model.merge_and_unload()
        for p, flag in zip(merged.parameters(), self._requires_grad):
            p.requires_grad_(flag)
        return merged

    # ---------------------------------------------------------------- the protocol

    def forget(self, forget_classes, forget_data, retain_data) -> ForgettingReport:
        """Forget `forget_classes` (ids or label names): train a fresh adapter on `forget_data` (examples of
        exactly those classes) and the replay set `retain_data` (retained classes only), then merge it."""
        from ...engine import TrainingArguments, fit

        cfg = self.config.for_task(len(self.tasks) + 1)
        classes = self.class_ids(forget_classes)
        forget, retain = self._encode(forget_data, "forget_data"), self._encode(retain_data, "retain_data")
        if cfg.few_shot is not None:
            forget, retain = self._few_shot(forget), self._few_shot(retain)
        self._check_task(classes, forget, retain)
        evaluation = self.eval_set or {
            k: torch.cat([forget[k], retain[k], *(t["forget_data"][k] for t in self.tasks)]) for k in forget}

        head = self._head_name() if cfg.prototypes else None
        before, _ = self._predict(self.model, evaluation)
        acc_f_before, acc_r_before = self._accuracies(before, evaluation["labels"], classes)
        if acc_f_before is None or acc_r_before is None:
            raise ValueError("eval_data needs examples of the classes being forgotten and of retained classes")
        tap = EmbeddingTap(self.model.get_submodule(head)) if head else None
        prototypes = None
        if tap is not None:
            train_x = {k: torch.cat([forget[k], retain[k]]) for k in forget}
            _, embeddings = self._predict(self.model, train_x, tap)
            prototypes = class_prototypes(embeddings, train_x["labels"], len(self.id2label)).to(
                next(self.model.parameters()).device)

        model = self._attach_adapter()
        groups = lora_groups(model, self.targets, cfg.group_type) if cfg.tune == "lora" and cfg.alpha > 0 else []
        recipe = GSLoRARecipe(cfg, groups, classes, self.forgotten, acc_f_before, prototypes, tap)
        run_dir = self.output_dir / f"task-{len(self.tasks) + 1}"
        args = TrainingArguments(
            output_dir=str(run_dir), num_epochs=cfg.num_epochs, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, lr_scheduler=cfg.lr_scheduler,
            ema_decay=cfg.ema_decay, ema_start_epoch=cfg.ema_start_epoch, seed=cfg.seed, keep_checkpoints=1)
        try:
            # The engine's per-epoch evaluation runs on the task's own (small) training data, so it costs little;
            # the report below is measured on the evaluation set.
            seen = EvalSet({k: torch.cat([forget[k], retain[k]]) for k in forget})
            result = fit(model, {"train": PairedReplay(retain, forget), "test": seen}, recipe, args,
                         desc=f"forgetting task {len(self.tasks) + 1}")
        except BaseException:
            # An interrupted task leaves the model as it was: the half-trained adapter is dropped, not merged.
            if cfg.tune == "lora":
                self.model = model.unload()
            raise
        finally:
            if tap is not None:
                tap.remove()
        trained = result.ema_model if cfg.ema_decay is not None else model
        norms = block_norms(trained, self.targets) if cfg.tune == "lora" else []
        self.model = self._detach_adapter(trained)
        if cfg.tune == "lora" and PartialState().is_main_process:  # where the engine wrote the adapter
            # The adapter applies to the model merged after the earlier tasks, which no folder holds: it is stored
            # with theirs, as one adapter on the original model.
            stack_adapters(run_dir, self.tasks[-1]["run_dir"] if self.tasks else None, self.base_model)

        after, _ = self._predict(self.model, evaluation)
        m = forgetting_metrics(after.tolist(), evaluation["labels"].tolist(), classes, self.forgotten, acc_f_before)
        report = ForgettingReport(
            task=len(self.tasks) + 1, forget_classes=[self.id2label[c] for c in classes],
            acc_f_before=acc_f_before, acc_r_before=acc_r_before, acc_f=m["acc_f"], acc_r=m["acc_r"],
            acc_o=m["acc_o"], drop=m["drop"], h_mean=m["h_mean"], block_norms=norms,
            train_seconds=result.train_seconds)
        self.tasks.append({"classes": classes, "run_dir": run_dir, "forget_data": forget})
        self.reports.append(report)
        return report

    # ---------------------------------------------------------------- saving

    def result(self):
        """The run result so far (`hfpapers.runs.RunResult`): the before/after table and block norms per task."""
        from .runner import forgetting_result

        return forgetting_result([r.to_dict() for r in self.reports], self.config.to_dict(),
                                 _hub_id(self.base_model), self.config.tune)

    def save_pretrained(self, save_directory: str) -> Path:
        """The merged model (safetensors) and processor, under `adapters/task-<t>/` the peft adapter of tasks 1..t
        on the original model (`AutoPeftModel.from_pretrained` of it is the model after task t), results.json and
        the card. Only the main process writes."""
        from ...runs import write_results

        out = Path(save_directory)
        if not PartialState().is_main_process:
            return out
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        if self.processor is not None:
            self.processor.save_pretrained(out)
        if self.config.tune == "lora":
            for t, task in enumerate(self.tasks, start=1):
                (out / "adapters" / f"task-{t}").mkdir(parents=True, exist_ok=True)
                for name in ADAPTER_FILES:
                    shutil.copy(task["run_dir"] / name, out / "adapters" / f"task-{t}" / name)
        write_results(out, "gs-lora", self.result(), config=self.config)
        return out
