"""FTWT: FLOPs that the sparse execution really skips, and its wall time against the dense model.

For each preset and each target share of filters kept, the predictors are set so that about that share of every
unit's filters runs, differently for each image (random weights scaled up, biases at the matching quantile), with
random BN statistics. Per image, on `--images` random inputs:

- executed MACs: what `SparseExecutor` runs (sliced convolutions over the channels that can be non-zero, and the
  classifier); the predictors' 1x1 convolutions are listed apart;
- time per image, batch 1, median over `--repeats` passes: the dense model (masking off), the masked dense
  execution (full convolutions times the masks, what training runs), and the sparse execution (what inference
  runs); the dense model at batch `--batch-size` is given for scale. By default the process's CPU time on one
  thread (`--clock wall` for wall time).

    python evaluation/benchmarks/ftwt.py [--presets resnet56-cifar10 vgg16-bn-cifar10] [--keep 1.0 0.5 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def set_keep_share(model, share: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        for predictor in model.ftwt.mask_predictors:
            conv = predictor.conv
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * conv.in_channels)
            # the quantile that leaves `share` of the logits (on a uniform softmax input) above 0
            base = conv.weight[:, :, 0, 0].mean(1)
            threshold = torch.quantile(base, 1 - share) if share < 1 else base.min() - 1
            conv.bias.copy_(-threshold + (1e-3 if share < 1 else 1.0))


def median_seconds(fn, repeats: int, clock) -> float:
    """Median over `repeats` runs after a warm-up, of the process's CPU time (`--clock cpu`, robust to other
    processes on a shared machine when torch runs one thread) or of wall time (`--clock wall`)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def measure(model, images: torch.Tensor, repeats: int, batch_size: int, clock) -> dict:
    model.eval()
    with torch.inference_mode():
        sparse = model(pixel_values=images, sparse=True)
        masked = model(pixel_values=images)
        assert torch.equal(sparse.macs, masked.macs)
        torch.testing.assert_close(sparse.logits, masked.logits, atol=1e-3, rtol=1e-3)
        kept = torch.cat([m.flatten() for m in masked.masks]).mean().item()

        def per_image(**kwargs):
            return lambda: [model(pixel_values=image[None], **kwargs) for image in images]

        timed = {"masked": median_seconds(per_image(), repeats, clock) / len(images),
                 "sparse": median_seconds(per_image(sparse=True), repeats, clock) / len(images)}
        model.config.masking = False
        try:
            timed["dense"] = median_seconds(per_image(), repeats, clock) / len(images)
            batch = images.repeat((batch_size + len(images) - 1) // len(images), 1, 1, 1)[:batch_size]
            timed["dense_batched"] = median_seconds(lambda: model(pixel_values=batch), repeats, clock) / batch_size
        finally:
            model.config.masking = True
    return {"kept": kept, "macs": sparse.macs.mean().item(), "predictor_macs": sparse.predictor_macs[0].item(),
            **timed}


def main(argv: list[str] | None = None) -> None:
    import hfpapers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["resnet56-cifar10", "vgg16-bn-cifar10"])
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                        help="target shares of filters kept per unit")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="CPU time of this process (default; with one thread, what the work costs even on a "
                             "busy machine) or wall time")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} time\n")
    print("| preset | target keep | kept filters | executed MMACs/img | dense MMACs/img | FLOPs reduction | "
          "predictor MMACs | dense ms/img (b=1) | masked ms/img (b=1) | sparse ms/img (b=1) | sparse / dense | "
          f"dense ms/img (b={args.batch_size}) |")
    print("|" + "---|" * 12)
    for preset in args.presets:
        torch.manual_seed(0)
        model = hfpapers.create_model("ftwt", preset=preset).eval()
        c = model.config
        images = torch.randn(args.images, c.num_channels, c.image_size, c.image_size,
                             generator=torch.Generator().manual_seed(1))
        dense = model.dense_macs()
        for share in args.keep:
            set_keep_share(model, share)
            r = measure(model, images, args.repeats, args.batch_size, clock)
            print(f"| {preset} | {share:.2f} | {r['kept']:.3f} | {r['macs'] / 1e6:.2f} | {dense / 1e6:.2f} | "
                  f"{100 * (1 - r['macs'] / dense):.1f}% | {r['predictor_macs'] / 1e6:.3f} | "
                  f"{1e3 * r['dense']:.2f} | {1e3 * r['masked']:.2f} | {1e3 * r['sparse']:.2f} | "
                  f"{r['sparse'] / r['dense']:.2f}x | {1e3 * r['dense_batched']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
