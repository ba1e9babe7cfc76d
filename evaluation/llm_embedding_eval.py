"""Evaluate LLM-embedding checkpoints on the embedded benchmark and compare them as the paper does.

    python evaluation/llm_embedding_eval.py BASELINE_DIR OTHER_DIR [...] [--names A B ...] [--json out.json]

Each folder is loaded with `AutoModel.from_pretrained` and `AutoTokenizer.from_pretrained`; every dataset of the
embedded suite (STS, classification, retrieval, clustering; several datasets each) is scored, and the table shows
the first model's mean score per category and every other model's mean delta, starred where the paired Wilcoxon
signed-rank test over the category's datasets gives p < 0.05.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="checkpoints; the first is the baseline")
    parser.add_argument("--names", nargs="+", help="row names (default: folder names)")
    parser.add_argument("--suite-seed", type=int, default=1000, help="seed of the embedded benchmark's world")
    parser.add_argument("--sets-per-category", type=int, default=6)
    parser.add_argument("--json", help="also write every per-dataset score here")
    args = parser.parse_args(argv)
    import hfpapers  # noqa: F401  (registers the model classes with the Auto classes)
    from hfpapers.data.text import build_eval_suite
    from hfpapers.methods.llm_embedding.metrics import evaluate_checkpoint, format_table

    names = args.names or [Path(f).name for f in args.folders]
    if len(names) != len(args.folders):
        parser.error(f"--names gives {len(names)} names for {len(args.folders)} folders")
    suite = build_eval_suite(seed=args.suite_seed, sets_per_category=args.sets_per_category)
    results = {name: evaluate_checkpoint(folder, suite) for name, folder in zip(names, args.folders)}
    print(format_table(results, baseline=names[0]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
