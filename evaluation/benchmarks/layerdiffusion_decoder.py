"""Time and peak memory of LayerDiffuse's transparent decoder: one pass against the official 8-pass augmentation.

`TransparentVAEDecoder` with its default config (the released "UNet1024", 104.1M parameters) decodes one image of
`--size` x `--size` pixels: a single pass, `decoder.estimate(pixel, latent, augment=False)`, and the official
test-time augmentation, `decoder.estimate(pixel, latent, augment=True, passes_per_batch=k)` for each k of
`--passes` (the 8 flipped / rotated passes run in batches of k; on a square image all 8 can go as one batch).
Inputs: pixel = torch.rand(1, 3, size, size), latent = torch.randn(1, 4, size / 8, size / 8); random weights
(speed does not depend on their values); eval mode, under torch.no_grad().

Each configuration runs in a fresh child process ('spawn'), which builds the model and the inputs, makes one
untimed warm-up call and then `--repeats` timed calls; the median is kept. Peak extra memory is what the calls
(warm-up included) needed on top of the built model and inputs: on CPU the growth of the child's peak resident set
(Linux: the peak is reset to the current RSS through /proc/self/clear_refs after building, then read from VmHWM;
elsewhere `resource.getrusage(RUSAGE_SELF).ru_maxrss` after the calls minus its value after building); on CUDA
`torch.cuda.max_memory_allocated()` minus the memory allocated after building.

    python evaluation/benchmarks/layerdiffusion_decoder.py [--size 512] [--repeats 3] [--dtype float32]
        [--device cpu] [--passes 8 4 2 1] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import resource
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from hfpapers.testing.benchmark import MachineLoad, run_times

PASSES = 8  # the official augmentation: 4 quarter turns, each with and without a horizontal flip


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: set the peak resident set ("high water mark") to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _maxrss_kib() -> float:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024 if sys.platform == "darwin" else maxrss  # bytes on macOS, KiB on Linux


def run_configuration(size: int, augment: bool, passes_per_batch: int, repeats: int, dtype: str, device: str,
                      threads: int) -> dict:
    """In a fresh process: build the decoder and inputs, warm up once, time `repeats` calls; seconds and peak memory."""
    from diffusers.utils import logging as diffusers_logging

    from hfpapers.methods.layerdiffusion.modeling_layerdiffusion import TransparentVAEDecoder

    diffusers_logging.set_verbosity_error()  # silence the "cast with .to()" advice for --dtype bfloat16
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device)
    decoder = TransparentVAEDecoder().to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    pixel = torch.rand(1, 3, size, size, device=device)
    latent = torch.randn(1, 4, size // 8, size // 8, device=device)
    cuda = device.type == "cuda"

    def call():
        decoder.estimate(pixel, latent, augment=augment, passes_per_batch=passes_per_batch)
        if cuda:
            torch.cuda.synchronize(device)

    gc.collect()
    hwm = False
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    elif hwm := _reset_peak_rss():
        base = _status_kib("VmRSS")
    else:
        base = _maxrss_kib()
    with torch.no_grad():
        times = run_times(call, 1, repeats)
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mib = max((_status_kib("VmHWM") if hwm else _maxrss_kib()) - base, 0) / 1024
    return {"params": sum(p.numel() for p in decoder.parameters()), "seconds": statistics.median(times),
            "all_seconds": times, "peak_extra_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image height and width (a multiple of 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (median kept)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--passes", type=int, nargs="+", default=[8, 4, 2, 1],
                        help="passes_per_batch values of the 8-pass augmented decoding")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's, i.e. OMP_NUM_THREADS or all cores)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.size % 64:
        parser.error(f"--size must be a multiple of 64 (the decoder downsamples 6 times), got {args.size}")
    if not all(1 <= k <= PASSES for k in args.passes):
        parser.error(f"--passes values must be between 1 and {PASSES}, got {args.passes}")

    configurations = [("single pass", False, 1)] + [(f"{PASSES}-pass augmented", True, k) for k in args.passes]
    context = multiprocessing.get_context("spawn")
    rows = []
    with MachineLoad() as load:
        for mode, augment, k in configurations:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:  # a fresh process per configuration
                result = pool.submit(run_configuration, args.size, augment, k, args.repeats, args.dtype, args.device,
                                     args.threads).result()
            rows.append({"mode": mode, "passes_per_batch": k, **result})
            print(f"  {mode}, passes_per_batch {k}: {result['seconds']:.2f} s, "
                  f"{result['peak_extra_mib']:.0f} MiB", file=sys.stderr, flush=True)

    memory = "peak RSS growth" if torch.device(args.device).type == "cpu" else "max_memory_allocated growth"
    print(f"# TransparentVAEDecoder (UNet1024, {rows[0]['params'] / 1e6:.1f}M params), 1 image {args.size}x{args.size}, "
          f"{args.dtype}, {args.device}, {args.threads} threads, torch {torch.__version__}, median of {args.repeats} "
          f"after 1 warm-up, memory = {memory}; load average {load.load_before:.2f} before, "
          f"{load.load_after:.2f} after; {load.wall_s:.0f} s wall-clock\n")
    print("| mode | passes per batch | seconds per image (median) | x single pass | peak extra memory (MiB) |")
    print("|---|---|---|---|---|")
    single = rows[0]["seconds"]
    for row in rows:
        print(f"| {row['mode']} | {row['passes_per_batch']} | {row['seconds']:.2f} | {row['seconds'] / single:.2f} | "
              f"{row['peak_extra_mib']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "dtype": args.dtype, "device": args.device, "threads": args.threads,
                       "repeats": args.repeats, "load_average": [load.load_before, load.load_after], "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
