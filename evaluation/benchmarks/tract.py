"""Cost of a TrAct training step against a plain one, ours (`apply_tract`) against the official torch-tract.

Three copies of the same model (same weights, same batch) take full SGD train steps (forward with labels, loss,
backward, step) in alternation: plain, with the official `torch_tract.TrAct` wrapper on the first layer, and with
`apply_tract`. The table gives the median milliseconds per step and each TrAct variant's step as a multiple of the
plain one (the issue's target: ours no more than torch-tract's). Random weights: speed does not depend on them.

    pip install torch-tract   # the official package (MIT), only for this comparison
    python evaluation/benchmarks/tract.py [--batch-size 128] [--repeats 15] [--threads N] [--json out.json]

Models: a CIFAR-style ResNet stem (transformers ResNet with a 3x3 stride-1 first convolution, n = 27; the
paper's ResNet-18 setting), a ViT with 4x4 patches on 32 px (n = 48) and the zoo's Scaling MLP (a Linear on
16x16x3 pixels, n = 768 > batch: the Woodbury form).
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch

from hfpapers.testing.benchmark import MachineLoad, interleaved_medians


def models(batch_size: int) -> dict[str, tuple[torch.nn.Module, str, torch.Tensor]]:
    """name -> (model, its first layer's name, pixel batch)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    import hfpapers

    torch.manual_seed(0)
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=64, hidden_sizes=[64, 128], depths=[1, 1],
                                                       layer_type="basic", num_labels=10,
                                                       downsample_in_first_stage=False))
    # The CIFAR variant of ResNet-18's stem (3x3, stride 1, no max-pool), as in the paper's CIFAR runs.
    resnet.resnet.embedder.embedder.convolution = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
    resnet.resnet.embedder.pooler = torch.nn.Identity()
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=4,
                                              num_attention_heads=3, intermediate_size=384, num_labels=10))
    mlp = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=10)
    return {
        "ResNet (CIFAR stem 3x3, 32 px)": (resnet, "resnet.embedder.embedder.convolution",
                                           torch.randn(batch_size, 3, 32, 32)),
        "ViT (patch 4, 32 px)": (vit, "vit.embeddings.patch_embeddings.projection", torch.randn(batch_size, 3, 32, 32)),
        "Scaling MLP tiny (16 px)": (mlp, "mlp.linear_in", torch.randn(batch_size, 3, 16, 16)),
    }


def with_official(model: torch.nn.Module, layer: str, l: float) -> torch.nn.Module:
    import torch_tract

    model = copy.deepcopy(model)
    parent, _, name = layer.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, name, torch_tract.TrAct(getattr(owner, name), l=l))
    return model


def train_step(model, pixels, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> None:
    from hfpapers.methods.tract import apply_tract

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--l", type=float, default=0.1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    try:
        import torch_tract  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark compares with the official package: pip install torch-tract")
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | plain ms/step | torch-tract ms/step (x plain) | ours ms/step (x plain) |\n|---|---|---|---|")
    with MachineLoad() as load:
        for name, (model, layer, pixels) in models(args.batch_size).items():
            labels = torch.randint(0, 10, (len(pixels),))
            official = with_official(model, layer, args.l)
            ours = copy.deepcopy(model)
            assert apply_tract(ours, args.l) == layer
            medians = interleaved_medians({"plain": train_step(model, pixels, labels),
                                           "torch-tract": train_step(official, pixels, labels),
                                           "ours": train_step(ours, pixels, labels)}, args.warmup, args.repeats)
            ms = {k: 1e3 * m.seconds for k, m in medians.items()}
            rows.append(r := {"model": name, **{f"{k}_ms": v for k, v in ms.items()},
                              "torch_tract_x": ms["torch-tract"] / ms["plain"], "ours_x": ms["ours"] / ms["plain"]})
            print(f"| {r['model']} | {r['plain_ms']:.1f} | {r['torch-tract_ms']:.1f} ({r['torch_tract_x']:.3f}x) | "
                  f"{r['ours_ms']:.1f} ({r['ours_x']:.3f}x) |", flush=True)
    print(f"\nbatch {args.batch_size}, {args.threads} threads, {args.repeats} interleaved rounds (median), "
          f"load {load.load_before:.1f} -> {load.load_after:.1f}, background {load.background or 0:.0%}")
    print("\ntarget (ours no slower than torch-tract): "
          + ", ".join(f"{r['model']}: {'met' if r['ours_ms'] <= r['torch-tract_ms'] else 'missed'}" for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
