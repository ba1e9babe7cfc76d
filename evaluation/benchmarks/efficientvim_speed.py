"""EfficientViM inference speed on CPU: the unfused model against its fused copy, and against this machine's fp32
matmul rate.

For each paper preset (M1-M3 at 224 px, M4 at 256 px) this builds the image classifier with random weights, puts it
in eval mode and fuses a deep copy (`fuse()`: BatchNorms folded into their convs, the gated depthwise branches and
PatchMerging residuals folded into single depthwise kernels). It then reports:

- MACs per image: `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2 at batch 1 (convs, the two HSM-SSD matmuls and
  the heads; norms and element-wise ops are not counted, so fusing does not change the count);
- images/s of the unfused and the fused model at `--batch-size` under `torch.inference_mode()`: the median of
  `--repeats` timed forwards after `--warmup` untimed ones, unfused and fused interleaved (A, B, A, B, ...) so that
  background load hits both alike;
- the GFLOP/s they achieve (2 * MACs * images/s) and their fraction of the fp32 matmul rate measured in the same run
  (median time of a 2048x2048 @ 2048x2048 matmul after warm-up);
- the max abs difference between the unfused and fused logits on the timed batch (and relative to the largest logit);
- the median minor page faults per timed forward (unfused / fused), and the share of the machine's CPU time that
  other processes took during the run: the two things that made timings on a small shared machine vary most.

Weights are random (the official init), with the BatchNorm running statistics and affine parameters and the branch
gates randomised too, so that `fuse()` folds non-trivial values: the speed of these ops (convs, matmuls,
element-wise, softmax) does not depend on weight values.

    python evaluation/benchmarks/efficientvim_speed.py [--presets M1 M2 M3 M4] [--batch-size 16] [--repeats 15]
        [--warmup 3] [--threads N] [--json results.json]

With glibc's default malloc, freed activation buffers are often handed back to the kernel and faulted in again on
the next forward, which costs up to ~30% here and changes from run to run. For steady-state numbers prefix the
command with `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296` (see EFFICIENTVIM.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform

import torch

import hfpapers
from hfpapers.testing.benchmark import MATMUL_SIZE, MachineLoad, count_flops, interleaved_medians, matmul_gflops

PRESETS = ("M1", "M2", "M3", "M4")
# glibc malloc settings that keep freed activations in the process (no page faults in the timed forwards): the
# largest mmap threshold glibc accepts (32 MiB on 64-bit) and no trimming of the heap.
STEADY_MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296"


def count_macs(model, pixel_values: torch.Tensor) -> int:
    """Multiply-accumulates of one forward (FlopCounterMode counts 2 FLOPs per MAC of convs, matmuls, linears)."""
    with torch.inference_mode():
        return count_flops(lambda: model(pixel_values=pixel_values)) // 2


@torch.no_grad()
def perturb_inference_statistics(model, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters, and the block gates spread-out
    logits. At init the BatchNorms are identities (mean 0, var 1, weight 1, bias 0) and every gate is ~0.5, so
    folding them would be checked only trivially; the op shapes, and so the speed, are unchanged."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            module.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=generator))
            module.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=generator))
            module.bias.copy_(0.1 * torch.randn(c, generator=generator))
        elif isinstance(getattr(module, "alpha", None), torch.nn.Parameter):  # EfficientViMBlock's 4 gates
            module.alpha.copy_(torch.randn(module.alpha.shape, generator=generator))


def benchmark(preset: str, args, peak_gflops: float) -> dict:
    torch.manual_seed(0)
    model = hfpapers.create_model("efficientvim", preset=preset).eval()
    perturb_inference_statistics(model, torch.Generator().manual_seed(0))
    fused = copy.deepcopy(model).fuse()
    config = model.config
    size = config.image_size

    macs = count_macs(model, torch.randn(1, config.num_channels, size, size))
    fused_macs = count_macs(fused, torch.randn(1, config.num_channels, size, size))

    pixel_values = torch.randn(args.batch_size, config.num_channels, size, size)
    with torch.inference_mode():
        medians = interleaved_medians({"unfused": lambda: model(pixel_values=pixel_values),
                                       "fused": lambda: fused(pixel_values=pixel_values)}, args.warmup, args.repeats)
        (unfused_s, unfused_faults), (fused_s, fused_faults) = medians["unfused"], medians["fused"]
        logits = model(pixel_values=pixel_values).logits
        fused_logits = fused(pixel_values=pixel_values).logits
    max_abs_diff = (logits - fused_logits).abs().max().item()

    unfused_ips, fused_ips = args.batch_size / unfused_s, args.batch_size / fused_s
    unfused_gflops, fused_gflops = 2 * macs * unfused_ips / 1e9, 2 * fused_macs * fused_ips / 1e9
    return {
        "preset": preset,
        "input": f"{config.num_channels}x{size}x{size}",
        "params": sum(p.numel() for p in model.parameters()),
        "macs_per_image": macs,
        "fused_macs_per_image": fused_macs,
        "unfused_images_per_s": unfused_ips,
        "fused_images_per_s": fused_ips,
        "fused_speedup": fused_ips / unfused_ips,
        "unfused_gflops": unfused_gflops,
        "fused_gflops": fused_gflops,
        "unfused_fraction_of_peak": unfused_gflops / peak_gflops,
        "fused_fraction_of_peak": fused_gflops / peak_gflops,
        "unfused_page_faults_per_forward": unfused_faults,
        "fused_page_faults_per_forward": fused_faults,
        "fused_max_abs_logit_diff": max_abs_diff,
        "max_abs_logit": logits.abs().max().item(),
        "fused_rel_logit_diff": max_abs_diff / logits.abs().max().item(),
    }


def markdown_table(rows: list[dict]) -> str:
    header = ("| preset | input | params | MMACs/img | unfused img/s | fused img/s | fused/unfused "
              "| unfused GFLOP/s | fused GFLOP/s | unfused/peak | fused/peak | page faults/fwd "
              "| max abs logit diff (rel.) |")
    lines = [header, "|" + "---|" * (header.count(" | ") + 1)]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['params'] / 1e6:.2f}M | {r['macs_per_image'] / 1e6:.1f} "
            f"| {r['unfused_images_per_s']:.1f} | {r['fused_images_per_s']:.1f} | {r['fused_speedup']:.2f}x "
            f"| {r['unfused_gflops']:.1f} | {r['fused_gflops']:.1f} | {r['unfused_fraction_of_peak']:.3f} "
            f"| {r['fused_fraction_of_peak']:.3f} "
            f"| {r['unfused_page_faults_per_forward']:.0f} / {r['fused_page_faults_per_forward']:.0f} "
            f"| {r['fused_max_abs_logit_diff']:.1e} ({r['fused_rel_logit_diff']:.0e}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per model (the median is kept)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards per model before timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    malloc_env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    # Other processes on these cores skew every number; report how busy the machine was around the run.
    with MachineLoad() as load:
        peak = matmul_gflops(args.warmup, args.repeats)
        rows = []
        for preset in args.presets:
            rows.append(benchmark(preset, args, peak))
            gc.collect()

    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, eval + inference_mode, median of {args.repeats} timed forwards after "
          f"{args.warmup} warm-up (unfused and fused interleaved); 1-min load average {load.load_before:.2f} before, "
          f"{load.load_after:.2f} after; {load.wall_s:.0f} s")
    print(f"malloc environment: {' '.join(malloc_env) if malloc_env else 'glibc defaults (no MALLOC_* variables)'}")
    if load.background is not None:
        print(f"background: other processes used {100 * load.background:.1f}% of the machine's CPU time during the run "
              "(a few % already slows these timings; rerun when it is near 0)")
    print(f"peak: fp32 matmul {MATMUL_SIZE}x{MATMUL_SIZE} @ {MATMUL_SIZE}x{MATMUL_SIZE} = {peak:.1f} GFLOP/s\n")
    print(markdown_table(rows))
    print("\nMACs = FlopCounterMode FLOPs / 2 at batch 1 (convs, HSM-SSD matmuls, heads; norms and element-wise ops "
          "are not counted); GFLOP/s = 2 * MACs * images/s. Weights are random (official init): the speed of these "
          "ops does not depend on weight values. BatchNorm statistics and gates are randomised so that fusing them is "
          "really checked: 'max abs logit diff' compares the fused copy with the unfused model on the timed batch, "
          "rel. = that / max abs logit.")
    if any(r["unfused_page_faults_per_forward"] or r["fused_page_faults_per_forward"] for r in rows):
        print("\npage faults/fwd > 0: glibc malloc hands freed activations back to the kernel and each forward "
              "faults them in again, which costs time and varies from run to run. For steady-state numbers run with "
              f"{STEADY_MALLOC_ENV} (or under jemalloc / tcmalloc).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
                       "batch_size": args.batch_size, "repeats": args.repeats, "warmup": args.warmup,
                       "matmul_size": MATMUL_SIZE, "matmul_gflops": peak, "load_average_before": load.load_before,
                       "load_average_after": load.load_after, "background_cpu_fraction": load.background,
                       "malloc_env": malloc_env,
                       "seconds": load.wall_s, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
