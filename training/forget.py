"""Continual forgetting with GS-LoRA / GS-LoRA++ through the shared engine:

    accelerate launch --multi_gpu --num_processes 2 training/forget.py --model path/or/hub-id \
        --tasks circle,square --tasks triangle,diamond --few-shot 4 --output-dir out/ --set alpha=1e-3

Each `--tasks` is one task (class names or ids, comma-separated), forgotten in order. Forget and replay data come
from the dataset's train split (every example of the task's classes / of the classes still kept, thinned to
`--few-shot` per class), the evaluation from its test split. Writes the merged model, one peft adapter per task,
forgetting_results.json and a model card to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from hfpapers.cli import column_map, key_values


def build_parser() -> argparse.ArgumentParser:
    from hfpapers.methods.gs_lora.config import GSLoRAConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local folder or Hub id of an image classifier")
    parser.add_argument("--tasks", action="append", required=True, metavar="CLASS,CLASS",
                        help="the classes one task forgets (repeat for several tasks)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--dataset", default="shapes", help="an embedded dataset, a Hub id or a local folder")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--column", action="append", default=[], metavar="NAME=SOURCE",
                        help="read column NAME (image, label) from the dataset's column SOURCE (repeatable)")
    parser.add_argument("--few-shot", type=int, default=None, help="examples per class kept for forget and replay")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a GSLoRAConfig field: {', '.join(f.name for f in fields(GSLoRAConfig))}")
    return parser


def run(args) -> list[dict]:
    from accelerate import PartialState

    from hfpapers import data
    from hfpapers.methods.gs_lora import ContinualForgetter, GSLoRAConfig
    from hfpapers.methods.gs_lora.forgetter import task_data

    settings = key_values(args.set, "--set")
    if args.few_shot is not None:
        settings["few_shot"] = args.few_shot
    config = GSLoRAConfig(**settings)
    splits = data.load(args.dataset, columns=column_map(args.column), seed=config.seed,
                       **key_values(args.dataset_option, "--dataset-option"))
    forgetter = ContinualForgetter(args.model, config, eval_data=splits["test"], output_dir=f"{args.output_dir}/runs")
    reports = []
    for task in args.tasks:
        classes = forgetter.class_ids([int(c) if c.strip().isdigit() else c.strip() for c in task.split(",")])
        forget, retain = task_data(splits["train"], classes, forgetter.forgotten)
        report = forgetter.forget(classes, forget, retain)
        reports.append(report.to_dict())
        if PartialState().is_main_process:
            print(json.dumps(report.to_dict()), flush=True)
    forgetter.save_pretrained(args.output_dir)
    return reports


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (KeyError, ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"forget: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
