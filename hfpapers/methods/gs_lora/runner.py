"""`hfpapers run gs-lora`: continual forgetting of a classifier's classes, task after task.

    hfpapers run gs-lora --model path/or/hub-id --tasks circle,square --tasks star --output-dir out/ --set few_shot=4
    accelerate launch --multi_gpu --num_processes 2 -m hfpapers run gs-lora --model ... (the same, on 2 processes)

Forget and replay data come from the dataset's train split (every example of the task's classes / of the classes
still kept, thinned to `few_shot` per class), the evaluation from its test split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...runs import RunResult, Runner, Table
from .config import GSLoRAConfig

__all__ = ["GSLoRARunner", "forgetting_result", "parse_task"]


def parse_task(text: str) -> list:
    """One `--tasks` value: class names or ids, comma-separated."""
    classes = [int(c) if c.strip().isdigit() else c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise ValueError(f"--tasks expects CLASS,CLASS,...; got {text!r}")
    return classes


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def method_name(config: dict) -> str:
    name = "GS-LoRA++" if config["prototypes"] else "GS-LoRA"
    if config["tune"] == "full":
        return "full fine-tuning (GS-LoRA's losses, every weight trained)"
    if config["alpha"] == 0:
        return name + " without the group-sparse penalty (plain LoRA)"
    return name


def forgetting_result(reports: list[dict], config: dict, base_model: str | None, tune: str) -> RunResult:
    """The run result of a forgetting run: the before/after table per task and the per-block LoRA norms."""
    method = method_name(config)
    removed = [c for r in reports for c in r["forget_classes"]]
    tables = [Table(
        "Before and after, measured here",
        ["task", "classes forgotten", "Acc_f before", "Acc_f after", "Acc_r before", "Acc_r after", "Acc_o", "Drop",
         "H-Mean"],
        [[r["task"], ", ".join(r["forget_classes"]), _percent(r["acc_f_before"]), _percent(r["acc_f"]),
          _percent(r["acc_r_before"]), _percent(r["acc_r"]), _percent(r["acc_o"]), _percent(r["drop"]),
          _percent(r["h_mean"])] for r in reports],
        "Accuracies in %, measured on the evaluation data the run was given. Acc_f: classes forgotten in that task "
        "(lower is better); Acc_r: classes still kept; Acc_o: classes forgotten in earlier tasks; Drop = Acc_f "
        "before − Acc_f after; H-Mean = 2·Drop·Acc_r / (Drop + Acc_r).")]
    num_blocks = max((len(r["block_norms"]) for r in reports), default=0)
    if num_blocks:
        tables.append(Table(
            "Which blocks changed", ["task", *(f"block {i}" for i in range(num_blocks))],
            [[r["task"], *(f"{n:.3f}" for n in r["block_norms"])] for r in reports if r["block_norms"]],
            "Per block, the sum of the Frobenius norms of the task's LoRA matrices (the quantity the paper plots): "
            "the group-sparse penalty drives the blocks it does not need towards zero."))
    usage = "```python\nfrom transformers import pipeline\n\nclassifier = pipeline(\"image-classification\", model=REPO)\n```"
    if tune == "lora":
        usage += ("\n\n`adapters/task-<t>/` is a peft adapter on the original model holding the LoRA of tasks 1..t "
                  "(the updates are additive, so they are stacked along the rank; task t's own LoRA is its last "
                  "rank block): loaded on the original model, it is the model after task t, and the last one is "
                  "this model.\n\n```python\nfrom peft import AutoPeftModel, PeftModel\n\n"
                  "after_task_1 = AutoPeftModel.from_pretrained(\"FOLDER/adapters/task-1\")  # a local copy of REPO\n"
                  "after_task_1 = PeftModel.from_pretrained(original_model, REPO, subfolder=\"adapters/task-1\")\n```")
    last = reports[-1] if reports else {}
    metrics = {"acc_f": last.get("acc_f"), "acc_r": last.get("acc_r"), "h_mean": last.get("h_mean")}
    return RunResult(
        summary=(f"{base_model or 'A local image classifier'} after {len(reports)} continual-forgetting task(s) with "
                 f"{method}. **Classes removed:** {', '.join(removed)}. The classifier still has their outputs; it "
                 "has been trained not to recognise them."),
        metrics={k: v for k, v in metrics.items() if v is not None},
        tables=tables, usage=usage, details={"tasks": reports}, base_model=base_model)


class GSLoRARunner(Runner):
    """Forgets each `--tasks` group of classes in order with `ContinualForgetter`, then saves the merged model,
    the per-task peft adapters and the report."""

    config_class = GSLoRAConfig

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tasks", action="append", type=parse_task, metavar="CLASS,CLASS",
                            help="the classes one task forgets, names or ids (repeat for several tasks; default: "
                                 "the preset's)")

    def run(self, config, model: str, datasets, output_dir: Path, tasks=None) -> RunResult:
        from accelerate import PartialState

        from .forgetter import ContinualForgetter, task_data

        if not tasks:
            raise ValueError("gs-lora needs at least one task: --tasks CLASS,CLASS")
        config.for_task(len(tasks))  # per-task settings for every task, checked before anything trains
        forgetter = ContinualForgetter(model, config, eval_data=datasets["test"], output_dir=str(output_dir / "runs"))
        for task in tasks:
            classes = forgetter.class_ids(task)
            forget, retain = task_data(datasets["train"], classes, forgetter.forgotten)
            report = forgetter.forget(classes, forget, retain)
            if PartialState().is_main_process:
                print(json.dumps(report.to_dict()), flush=True)
        forgetter.save_pretrained(output_dir)
        return forgetter.result()
