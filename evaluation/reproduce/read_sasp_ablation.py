"""READ's ablation at small scale: the same tiny LLaVA + SAM trained on the embedded referring scenes with
Similarity-as-Points (READ: SAM reads the SasP points and the `[SEG]` token) and without (LISA: the `[SEG]` token
alone), scored by gIoU and cIoU on the held-out scenes.

    python evaluation/reproduce/read_sasp_ablation.py --output-dir runs/read-ablation [--seeds 0 1]

For each seed, the READ arm first trains the small SAM from scratch on point prompts (the stand-in for SAM's
pre-training); the LISA arm starts from that same SAM, so the arms differ only in the prompts. Both are scored
teacher-forced on the reference answer, as LISA's `validate`; "positive points on the target" is the fraction of
SasP's positive points that fall inside the target mask (the similarity map is computed in both arms). The SAM row is that SAM with one positive and one
negative click on the target: what points alone give. An arm whose folder already holds its results is reused, so
an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfpapers.engine import train

ARMS = {"READ (SasP points + [SEG])": "tiny", "LISA ([SEG] only)": "tiny-lisa"}


def reproduce(output_dir: str, seeds=(0,), dataset_kwargs: dict | None = None, **settings) -> tuple[dict, str]:
    """Train both arms for every seed; returns {arm: [metrics per seed]} and the table (also written to
    output_dir)."""
    root = Path(output_dir)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    results["SAM, a click inside + a click outside"] = []
    for seed in seeds:
        runs = {}
        for arm, preset in ARMS.items():
            folder = root / f"seed{seed}" / preset
            sam = {} if not runs else {"base_sam": str(runs["tiny"] / "base-sam"), "sam_pretrain_epochs": 0}
            if not (folder / "train_results.json").exists():  # a finished arm is reused
                # an arm that did not finish starts over (its folder is only a cache of the result)
                train("read", str(folder), preset=preset, dataset_kwargs=dataset_kwargs, progress_bar=False,
                      seed=seed, overwrite_output_dir=True, **{**settings, **sam})
            runs[preset] = folder
            done = json.loads((folder / "train_results.json").read_text())
            results[arm].append({**done["eval"], "train_seconds": round(done["train_seconds"], 1)})
        sam_log = (runs["tiny"] / "base-sam" / "metrics.jsonl").read_text().splitlines()
        sam_evals = [json.loads(line) for line in sam_log]
        results["SAM, a click inside + a click outside"].append(
            {"giou": next(r["eval_iou"] for r in reversed(sam_evals) if "eval_iou" in r)})
    table = format_table(results, seeds)
    (root / "results.json").write_text(json.dumps(results, indent=2))
    (root / "table.md").write_text(table + "\n")
    return results, table


def format_table(results: dict, seeds) -> str:
    def mean(runs, key):
        values = [r[key] for r in runs if key in r]
        return f"{sum(values) / len(values):.3f}" if values else "–"

    lines = [f"| arm | gIoU | cIoU | positive points on the target | gIoU per seed ({', '.join(map(str, seeds))}) |",
             "|---|---|---|---|---|"]
    for arm, runs in results.items():
        per_seed = " / ".join(f"{r['giou']:.3f}" for r in runs)
        lines.append(f"| {arm} | {mean(runs, 'giou')} | {mean(runs, 'ciou')} | {mean(runs, 'point_precision')} "
                     f"| {per_seed} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/read-ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, help="READ-loss epochs per arm (default: the tiny preset's)")
    args = parser.parse_args(argv)
    settings = {"num_epochs": args.epochs} if args.epochs else {}
    _, table = reproduce(args.output_dir, seeds=args.seeds, **settings)
    print(table)


if __name__ == "__main__":
    main()
