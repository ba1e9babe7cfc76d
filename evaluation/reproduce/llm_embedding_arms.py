"""The paper's comparison at small scale: the five pooling/attention arms, trained the same way from the same
tiny decoder, scored on the embedded benchmark, and tabulated as the paper's Table (Model 1 absolute, the others
as deltas, `*` where the paired Wilcoxon test over each category's datasets gives p < 0.05).

    python evaluation/reproduce/llm_embedding_arms.py --output-dir runs/arms

Model 1's run first warms a fresh 4-layer Llama up by next-token prediction on the embedded texts (standing in
for the LLM pre-training the paper starts from); every arm then starts from that decoder with fresh LoRA.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hfpapers.data.text import build_eval_suite
from hfpapers.engine import train
from hfpapers.methods.llm_embedding import ARMS
from hfpapers.methods.llm_embedding.metrics import evaluate_checkpoint, format_table


def reproduce(output_dir: str, sets_per_category: int = 6, suite_size: int = 96,
              dataset_kwargs: dict | None = None, **settings) -> tuple[dict, str]:
    """Train and score every arm; returns the per-dataset results and the table (also written to output_dir)."""
    root = Path(output_dir)
    suite = build_eval_suite(sets_per_category=sets_per_category, size=suite_size)
    results, seconds, base = {}, {}, None
    for arm in ARMS:
        started = time.perf_counter()
        extra = {"pretrain_epochs": 0, "base_model": base} if base else {}
        train("llm-embedding", str(root / arm), preset=f"tiny-{arm}", dataset_kwargs=dataset_kwargs,
              progress_bar=False, overwrite_output_dir=True, **{**settings, **extra})
        base = base or str(root / arm / "base-decoder")
        results[arm] = evaluate_checkpoint(str(root / arm), suite)
        seconds[arm] = time.perf_counter() - started
    table = format_table(results, baseline="model-1")
    (root / "results.json").write_text(json.dumps({"results": results, "seconds": seconds}, indent=2))
    (root / "table.md").write_text(table + "\n")
    return results, table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/llm-embedding-arms")
    parser.add_argument("--epochs", type=int, help="contrastive epochs per arm (default: the tiny preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = {"seed": args.seed, **({"num_epochs": args.epochs} if args.epochs else {})}
    _, table = reproduce(args.output_dir, **settings)
    print(table)


if __name__ == "__main__":
    main()
