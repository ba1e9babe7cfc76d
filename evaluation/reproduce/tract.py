"""TrAct: Making First-layer Pre-Activations Trainable (tract): the paper's headline claim at small scale.

Claim (Fig. 1 / Fig. 3-4, §4): at equal epochs TrAct trains faster than the same training without it, so it reaches
the baseline's final accuracy in fewer epochs (the paper: 1.25x to 4x). Setting here: the embedded `shapes`
(10 classes, 16 px, 4,000 train / 1,000 test images), two architectures trained from scratch with the paper's ViT
optimiser (Adam, cosine schedule; lr 1e-3, batch 64, no weight decay), with and without TrAct (l = 0.1, the paper's
default) on the first layer, from the same initial weights and batches, one run per seed:

- `vit`: a ViT with 4x4 patches (the first layer is the patch embedding, n = 48), hidden 64, 2 blocks;
- `scaling-mlp`: the zoo's Scaling MLP (the first layer is a Linear on all 768 pixel values: the Woodbury form).

Pass criterion, fixed before the run: for each model, on the mean over seeds, TrAct's test accuracy is above the
baseline's at every epoch of the first half of training, and TrAct reaches the baseline's final accuracy at least
one epoch early (epochs saved >= 1). The table gives the mean test accuracy at epochs 1, E/4, E/2 and E, the
epoch at which TrAct first reaches the baseline's final accuracy and the epochs saved; accuracy.png the curves
(mean, seeds' range shaded), runs.json every curve.

    python evaluation/reproduce/tract.py --output-dir out/tract [--models vit scaling-mlp] [--epochs 10]
        [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfpapers.runs import Table

MODELS = ("vit", "scaling-mlp")


def build(name: str, labels: list[str]):
    import hfpapers

    id2label = dict(enumerate(labels))
    if name == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(
            image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, num_labels=len(labels), id2label=id2label))
    return hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=len(labels), id2label=id2label)


def reproduce(args: argparse.Namespace, output_dir: Path) -> tuple[Table, bool]:
    """Both arms of each model once per seed, through the procedure's `train_arm` (the engine's `fit`)."""
    import numpy as np
    import torch
    from transformers import ViTImageProcessor

    from hfpapers import data
    from hfpapers.methods.tract import TractConfig
    from hfpapers.methods.tract.runner import epochs_to_reach, plot_accuracy, train_arm

    datasets = data.load("shapes", resolution=16, num_train=args.num_train, num_test=1000)
    labels = datasets["train"].features["label"].names
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    runs, rows, passed = {}, [], True
    for name in args.models:
        curves = {"baseline": [], "TrAct": []}
        for seed in args.seeds:
            config = TractConfig(l=args.l, num_epochs=args.epochs, optimizer="adamw", learning_rate=1e-3,
                                 weight_decay=0.0, batch_size=64, seed=seed)
            torch.manual_seed(seed)
            initial = build(name, labels).state_dict()
            for arm in curves:
                model = build(name, labels)
                model.load_state_dict(initial)
                history = train_arm(model, processor, datasets, config, output_dir / "runs" / name / arm / str(seed),
                                    tract=arm == "TrAct", progress_bar=False)
                curves[arm].append([r["eval_accuracy"] for r in history if "eval_accuracy" in r])
                print(name, arm, seed, " ".join(f"{a:.3f}" for a in curves[arm][-1]), flush=True)
        runs[name] = curves
        base, tract = (np.mean(curves[arm], axis=0) for arm in ("baseline", "TrAct"))
        reached = epochs_to_reach(list(tract), base[-1])
        early = bool((tract[:args.epochs // 2] > base[:args.epochs // 2]).all())
        saved = args.epochs - reached if reached is not None else 0
        passed &= early and saved >= 1
        marks = sorted({1, max(1, args.epochs // 4), max(1, args.epochs // 2), args.epochs})
        rows.append([name, *(f"{base[e - 1]:.3f} / {tract[e - 1]:.3f}" for e in marks),
                     reached if reached is not None else "not reached", saved,
                     "pass" if early and saved >= 1 else "fail"])
        plot_accuracy(curves, output_dir / f"accuracy_{name}.png",
                      f"{name} on shapes (16 px), mean of {len(args.seeds)} seeds")
    (output_dir / "runs.json").write_text(json.dumps(runs, indent=2))
    table = Table(
        f"TrAct (l = {args.l}) against the same training without it, from scratch on shapes ({args.num_train} "
        f"train images), {args.epochs} epochs, mean of seeds {args.seeds}",
        ["model", *(f"epoch {e}: baseline / TrAct" for e in marks), "epoch TrAct reaches baseline's final",
         "epochs saved", "criterion"], rows,
        "Test accuracy (1,000 images). Criterion: TrAct above the baseline at every epoch of the first half, and at "
        "least one epoch saved to the baseline's final accuracy. Curves: accuracy_<model>.png; every run: "
        "runs.json.")
    return table, passed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="out/tract", help="where runs and results.json go")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--l", type=float, default=0.1, help="TrAct's lambda")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and arm")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table, passed = reproduce(args, output_dir)
    table.report(output_dir, seeds=args.seeds, epochs=args.epochs, passed=passed)
    print(f"\npass criterion {'met' if passed else 'NOT met'}")


if __name__ == "__main__":
    main()
