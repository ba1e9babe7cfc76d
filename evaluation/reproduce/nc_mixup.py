"""Mixup's influence on neural collapse (nc-mixup): the paper's §3 claims under a fixed simplex-ETF classifier.

Claim (abstract, Fig. 1 and §3): with mixup and a simplex-ETF classifier, the features of mixes of two examples of
one class align with that class's weight whatever the mixing weight λ, and the features of mixes of two classes lie
on the decision boundary at λ = 1/2. Setting here: the paper's protocol (`paper-fixed-etf` preset: α = 1, SGD 0.1,
momentum 0.9, weight decay 1e-4, 500 epochs, rate / 10 at 30 / 50 / 90 %) on an MLP feature extractor against a
frozen ETF head, trained on the embedded digits, one run per seed. The table gives, per seed, the measured values
next to the unconstrained features model's predictions (in brackets): cosine of same-class class means with w_c
and its spread over λ, the λ where the different-class logit gap crosses 0 and the gap at λ = 1/2, and the share of
different-class features inside span{w_c, w_c'}.

    python evaluation/reproduce/nc_mixup.py --output-dir out/nc_mixup [--preset fast] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfpapers.runs import Table


def reproduce(args: argparse.Namespace, output_dir: Path) -> Table:
    """Train and measure the fixed-ETF network once per seed; one row per seed."""
    from hfpapers import get_method
    from hfpapers.methods.nc_mixup.config import NcMixupConfig
    from hfpapers.methods.nc_mixup.experiments import fixed_etf_mixup

    preset = get_method("nc-mixup").preset(args.preset)
    rows, runs = [], []
    for seed in args.seeds:
        result = fixed_etf_mixup(NcMixupConfig(**{**preset, "seed": seed}))
        runs.append({k: v for k, v in result.items() if k != "pairs"})
        rows.append([seed, f"{result['accuracy']['test']:.3f}", f"{result['same_mean_cosine_mean']:.3f} (1)",
                     f"{result['same_mean_cosine_spread']:.3f} (0)", f"{result['same_norm_spread']:.3f} (0)",
                     f"{result['different_crossing_lambda']:.3f} (0.5)",
                     f"{result['different_gap_at_half']:.3f} (0)" if result["different_gap_at_half"] is not None
                     else "–", f"{result['different_in_span_mean']:.3f} (1)"])
    (output_dir / "runs.json").write_text(json.dumps(runs, indent=2))
    return Table(
        f"Fixed simplex-ETF classifier trained with mixup on digits ({args.preset} preset): measured (predicted)",
        ["seed", "test accuracy", "same: cos(class mean, w_c)", "its spread over λ", "‖h‖ spread over λ",
         "different: λ at gap 0", "gap at λ = 0.5", "share in span{w_c, w_c'}"], rows,
        "Predicted: the optimum of the unconstrained features model under the mixup loss with a simplex-ETF "
        "classifier. Per-λ values of every run: runs.json.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="out/nc_mixup", help="where runs and results.json go")
    parser.add_argument("--preset", default="paper-fixed-etf", help="a preset of the nc-mixup record")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reproduce(args, output_dir).report(output_dir, seeds=args.seeds)


if __name__ == "__main__":
    main()
