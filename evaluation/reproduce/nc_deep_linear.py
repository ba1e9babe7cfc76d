"""Neural Collapse in Deep Linear Networks (nc-deep-linear): the paper's synthetic experiment at the official sizes.

Claim (the paper's direct-optimisation figures; official synthetic_experiment_{balanced,imbalanced}.py): the deep
linear unconstrained features model optimised directly (SGD lr 0.1, momentum 0.9, N(0, 0.1^2) init,
lambda_W = lambda_H = 5e-4, 30,000 full-batch iterations, seed 2) collapses to the predicted geometry for every
depth M in {1, 3, 6, 9}: NC1-NC3 -> 0 against the orthogonal frame / simplex ETF (balanced) and the closed-form
general orthogonal frame (counts [200, 100, 50, 50]), with row norms ||w_k|| = s_k^M; minority classes collapse
where n_k <= N^2 lambda_W lambda_H (M = 1). The table gives measured and predicted norms side by side.

    python evaluation/reproduce/nc_deep_linear.py --output-dir out/nc_deep_linear [--hidden 2048 --depths 1]

At d = 2048 only M = 1 trains at lr 0.1: deeper products of N(0, 0.1^2) layers that wide make the first steps
diverge (within 6 iterations, in the official script too), so M in {3, 6, 9} run at the scripts' default d = 64.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfpapers.methods.nc_deep_linear.config import NcDeepLinearConfig
from hfpapers.runs import Table


def reproduce(args: argparse.Namespace, output_dir: Path) -> Table:
    """Every UFM arm at each depth and seed; one row per arm with its last-iterate NC metrics and norm error."""
    from hfpapers.methods.nc_deep_linear.experiments import ufm_arms
    from hfpapers.methods.nc_deep_linear.runner import _plot_norms, _plot_ufm

    rows = []
    for seed in args.seeds:
        config = NcDeepLinearConfig(hidden=args.hidden, depths=tuple(args.depths), num_iterations=args.iterations,
                                    record_every=max(args.iterations // 100, 1), seed=seed)
        arms = ufm_arms(config)
        _plot_ufm(arms, output_dir / f"ufm_nc_seed{seed}.png")
        _plot_norms(arms, output_dir / f"ufm_norms_seed{seed}.png")
        (output_dir / f"arms_seed{seed}.json").write_text(json.dumps(arms))
        for a in arms:
            last = a["layers"][0]
            rows.append([seed, a["arm"], a["loss"].upper(), "yes" if a["bias"] else "no", a["depth"],
                         *(f"{last[k]:.2e}" for k in ("nc1", "nc2_w", "nc2_h", "nc3")),
                         f"{100 * a['norm_error']:.2f} %" if "norm_error" in a else "–"])
    return Table("UFM at the last iterate (predicted: 0 and 0 %)",
                 ["seed", "arm", "loss", "bias", "M", "NC1", "NC2 W", "NC2 H", "NC3", "norm error"], rows,
                 "Norm error: the largest |measured - predicted| over ||w_k|| and ||h_k||, relative to the largest "
                 "predicted value (MSE, no bias). Plots: ufm_nc_seed*.png, ufm_norms_seed*.png.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="out/nc_deep_linear", help="where runs and results.json go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2], help="one run per seed (official: 2)")
    parser.add_argument("--hidden", type=int, default=64, help="d (README imbalanced runs: 2048)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 3, 6, 9])
    parser.add_argument("--iterations", type=int, default=30000)
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reproduce(args, output_dir).report(output_dir, seeds=args.seeds)


if __name__ == "__main__":
    main()
