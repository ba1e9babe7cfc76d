"""Throughput of every registered hfpapers model at its paper sizes, against this machine's fp32 matmul rate.

For each method (hfpapers.list_methods()) and each of its paper presets, used as registered (for Scaling MLP that
is the released ImageNet-21k head, 11,230 classes, at 64x64x3): parameters, forward FLOPs per image, forward and
train-step throughput, the GFLOP/s they achieve and their ratio to a 2048x2048 fp32 matmul timed in the same run.
Prints a markdown table; `--json PATH` also writes the numbers.

Each measurement gets about `--seconds-per-measurement` of timed runs: up to `--repeats` runs, fewer (at least 3)
for slow steps, and none for a step that alone takes longer (the row is skipped if that is the forward; its train
columns stay empty if it is the train step). So the default run stays short whatever models are registered.

    python evaluation/benchmarks/throughput.py [--threads N] [--batch-size 64] [--repeats 10] [--warmup 2]
        [--seconds-per-measurement 5] [--methods scaling-mlp] [--presets B_12-Wi_1024] [--json results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform

import torch

import hfpapers
from hfpapers.testing.benchmark import MATMUL_SIZE, StepTooSlow, count_flops, matmul_gflops, median_seconds

# The issue's target: the largest Scaling MLP's forward runs at no less than half the matmul rate.
TARGET = {"method": "scaling-mlp", "preset": "B_12-Wi_1024", "min_ratio": 0.5}


def example_batch(model, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixel_values and labels of the shape the model's config expects."""
    config = model.config
    if model.main_input_name != "pixel_values" or not hasattr(config, "image_size"):
        raise ValueError(f"no example input for main input {model.main_input_name!r}")
    pixel_values = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)
    return pixel_values, torch.randint(config.num_labels, (batch_size,))


def benchmark(slug: str, preset: str, args) -> dict:
    """One row of the table, without the ratios to the peak (main adds them once the peak is known)."""
    model = hfpapers.create_model(slug, preset=preset)
    config = model.config
    model.eval()
    pixel_values, _ = example_batch(model, 1)
    with torch.inference_mode():
        forward_flops = count_flops(lambda: model(pixel_values=pixel_values))
    model.train()
    # Forward + backward at batch 2 (batch norms cannot train on one sample), halved: every counted matmul,
    # weight gradients included, grows linearly with the batch.
    pixel_values, labels = example_batch(model, 2)
    train_flops = count_flops(lambda: model(pixel_values=pixel_values, labels=labels).loss.backward()) / 2
    model.zero_grad(set_to_none=True)

    pixel_values, labels = example_batch(model, args.batch_size)
    model.eval()
    with torch.inference_mode():
        forward_s = median_seconds(lambda: model(pixel_values=pixel_values), args.warmup, args.repeats,
                                   args.seconds_per_measurement, f"forward of batch {args.batch_size}")

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=pixel_values, labels=labels).loss.backward()
        optimizer.step()

    try:
        train_s = median_seconds(train_step, args.warmup, args.repeats, args.seconds_per_measurement,
                                 f"train step of batch {args.batch_size}")
        note = None
    except StepTooSlow as error:
        train_s, note = None, f"train step not timed: {error}"

    forward_ips = args.batch_size / forward_s
    forward_gflops = forward_flops * forward_ips / 1e9
    train_ips = None if train_s is None else args.batch_size / train_s
    train_gflops = None if train_s is None else train_flops * train_ips / 1e9
    return {
        "method": slug,
        "preset": preset,
        "input": f"{config.num_channels}x{config.image_size}x{config.image_size}",
        "classes": config.num_labels,
        "params": sum(p.numel() for p in model.parameters()),
        "forward_gflop_per_image": forward_flops / 1e9,
        "train_gflop_per_image": train_flops / 1e9,
        "forward_images_per_s": forward_ips,
        "forward_gflops": forward_gflops,
        "train_images_per_s": train_ips,
        "train_gflops": train_gflops,
        "note": note,
    }


def _cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    header = ("| method | preset | input | classes | params | fwd GFLOP/img | fwd img/s | fwd GFLOP/s | fwd/peak "
              "| train img/s | train GFLOP/s | train/peak |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['preset']} | {r['input']} | {r['classes']:,} | {r['params'] / 1e6:.1f}M "
            f"| {r['forward_gflop_per_image']:.3f} | {r['forward_images_per_s']:.0f} | {r['forward_gflops']:.1f} "
            f"| {r['forward_ratio']:.2f} | {_cell(r['train_images_per_s'], '.0f')} "
            f"| {_cell(r['train_gflops'], '.1f')} | {_cell(r['train_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed runs per measurement, at most (the median is kept)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement (>= 1)")
    parser.add_argument("--seconds-per-measurement", type=float, default=5.0,
                        help="time to spend on the timed runs of one measurement, about (default: 5)")
    parser.add_argument("--methods", nargs="+", help="method slugs (default: all)")
    parser.add_argument("--presets", nargs="+", help="preset names (default: each method's paper presets)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")

    torch.set_num_threads(args.threads)
    # Other processes on these cores skew every number; report how busy the machine was before we started.
    load_before = os.getloadavg()[0]
    peak_start = matmul_gflops(args.warmup, args.repeats)
    rows, skipped = [], []
    for record in hfpapers.list_methods():
        if args.methods and record.slug not in args.methods:
            continue
        if record.task != "image-classification":  # its own benchmark: llm_embedding_pooler.py
            skipped.append(f"{record.slug}: not an image model")
            continue
        presets = [p for p in args.presets if p in record.presets] if args.presets else record.paper_presets
        for preset in presets:
            try:
                rows.append(benchmark(record.slug, preset, args))
            except (ValueError, StepTooSlow) as error:
                skipped.append(f"{record.slug} {preset}: {error}")
            gc.collect()  # free the previous model before building the next (the largest hold ~1 GB with grads)
    # Timed again at the end, and the faster of the two kept: a busy spell at either end only lowers one of them.
    peak_end = matmul_gflops(args.warmup, args.repeats)
    peak = max(peak_start, peak_end)
    for row in rows:
        for step in ("forward", "train"):
            gflops = row[f"{step}_gflops"]
            row[f"{step}_ratio"] = None if gflops is None else gflops / peak

    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, median of up to {args.repeats} runs after {args.warmup} warm-up; "
          f"1-min load average before the run {load_before:.2f}")
    print(f"peak: fp32 matmul {MATMUL_SIZE}x{MATMUL_SIZE} @ {MATMUL_SIZE}x{MATMUL_SIZE} = {peak:.1f} GFLOP/s "
          f"(timed at the start: {peak_start:.1f}, at the end: {peak_end:.1f})\n")
    print(markdown_table(rows))
    print("\nFLOPs count matmuls only (FlopCounterMode); a train step is forward + backward + SGD step. "
          "Presets are used as registered (scaling-mlp's carry the released ImageNet-21k head, 11,230 classes).")
    for row in rows:
        if row["note"]:
            print(f"{row['method']} {row['preset']}: {row['note']}")
    for line in skipped:
        print(f"skipped {line}")

    target = next((r for r in rows if (r["method"], r["preset"]) == (TARGET["method"], TARGET["preset"])), None)
    if target is not None:
        met = target["forward_ratio"] >= TARGET["min_ratio"]
        print(f"\ntarget: {TARGET['method']} {TARGET['preset']} forward at batch {args.batch_size} reaches "
              f"{target['forward_ratio']:.2f} of the matmul rate (needs >= {TARGET['min_ratio']}): "
              f"{'MET' if met else 'NOT MET'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                       "repeats": args.repeats, "warmup": args.warmup,
                       "seconds_per_measurement": args.seconds_per_measurement, "matmul_gflops": peak,
                       "matmul_gflops_start_end": [peak_start, peak_end],
                       "load_average_before": load_before, "rows": rows,
                       "target": TARGET, "skipped": skipped}, f, indent=2)


if __name__ == "__main__":
    main()
