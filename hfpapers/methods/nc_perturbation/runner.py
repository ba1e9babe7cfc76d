"""`hfpapers run nc-perturbation`: Perturbation Analysis of Neural Collapse (arXiv 2210.16658).

    hfpapers run nc-perturbation --model path/or/hub-id --output-dir out/
    accelerate launch --multi_gpu --num_processes 2 -m hfpapers run nc-perturbation --model ...  (the same)

Three parts, each with the paper's prediction next to the measurement:
(a) the given classifier's penultimate features (the input of its classification head) on the first
    `num_examples` examples of `split` are H0; Eq. 2 is solved for each beta, and NC1 of H* is compared with NC1
    of H0 (Cor. 3.2: below for large beta) and with the first-order prediction H0 - (1/beta) N grad L(H0);
(b) synthetic: F's block singular values at Thm 2.1's collapsed minimiser against Thm 4.2's closed forms, Eq. 2
    on the minimiser plus within-class noise, and the central path against Thm 3.1's monotone quantities;
(c) the layer-wise MLP on the embedded digits (§5, Fig. 2): NC1 of the deepest features per added layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...analysis.neural_collapse import ClassStatistics, nc1, nc1_trace_ratio
from ...runs import RunResult, Runner, Table
from .config import NcPerturbationConfig
from .layerwise import collapse_of, image_matrix, train_layerwise_mlp
from .perturbation import (block_singular_values, central_path_flow, central_path_velocity, collapsed_minimizer,
                           first_order_map, solve_perturbation_model, targets, theorem_4_2)

__all__ = ["NcPerturbationRunner", "classifier_features", "beta_sweep", "spectrum_check", "synthetic_H0",
           "central_path_check"]


def _head(model, num_labels: int) -> torch.nn.Module:
    """The classification head: the one Linear layer with num_labels outputs."""
    heads = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if len(heads) != 1:
        raise ValueError(f"the penultimate features are the input of the classification head; found {len(heads)} "
                         f"Linear layers with {num_labels} outputs ({[n for n, _ in heads]}) instead of one")
    return heads[0][1]


@torch.no_grad()
def classifier_features(model, processor, dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, d) entering the classification head, labels (N,)) of an image classifier in eval mode."""
    if not {"image", "label"} <= set(dataset.column_names):
        raise ValueError(f"the analysis needs 'image' and 'label' columns; got {dataset.column_names}")
    captured = []
    handle = _head(model, model.config.num_labels).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].flatten(1).double()))
    model.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start:start + batch_size]
            model(pixel_values=processor(batch["image"], return_tensors="pt")["pixel_values"])
    finally:
        handle.remove()
    return torch.cat(captured), torch.as_tensor(dataset["label"])


def beta_sweep(H0, labels, num_classes, config: NcPerturbationConfig) -> list[dict[str, float]]:
    """Per beta: NC1 and the trace ratio of H0, of H* (Eq. 2 solved) and of the first-order prediction
    H0 + (1/beta) (-N grad L(H0)) (Eq. 2 is an implicit gradient step of size 1/beta, paper §3)."""
    before = collapse_of(H0.T, labels, num_classes)
    velocity = central_path_velocity(H0.double(), targets(labels, num_classes), config.lambda_W, config.lambda_H)
    rows = []
    for beta in config.betas:
        solution = solve_perturbation_model(H0, labels, num_classes, config.lambda_W, config.lambda_H, beta,
                                            config.solver_tolerance, config.solver_max_iterations)
        after = collapse_of(solution.H.T, labels, num_classes)
        predicted = collapse_of((H0 + velocity / beta).T, labels, num_classes)
        rows.append({"beta": beta, "nc1_H0": before["nc1"], "nc1_H": after["nc1"],
                     "trace_ratio_H0": before["nc1_trace_ratio"], "trace_ratio_H": after["nc1_trace_ratio"],
                     "trace_ratio_first_order": predicted["nc1_trace_ratio"], "iterations": solution.iterations,
                     "stationarity": solution.stationarity})
    return rows


def spectrum_check(config: NcPerturbationConfig) -> list[dict[str, float]]:
    """Per lambda_H of Fig. 1: F's block singular values at the collapsed minimiser and Thm 4.2's."""
    rows = []
    for lambda_H in config.spectrum_lambda_H:
        generator = torch.Generator().manual_seed(config.seed)
        W, H, labels = collapsed_minimizer(config.num_classes, config.feature_dim, config.samples_per_class,
                                           config.lambda_W, lambda_H, generator)
        F = first_order_map(W, H, labels, config.num_classes, config.lambda_W, lambda_H, config.spectrum_beta)
        rows.append({"lambda_H": lambda_H, "measured": block_singular_values(F, labels, config.feature_dim),
                     "predicted": theorem_4_2(config.lambda_W, lambda_H, config.spectrum_beta)})
    return rows


def synthetic_H0(config: NcPerturbationConfig):
    """Thm 2.1's collapsed minimiser (at lambda_W, lambda_H) plus within-class noise of relative std `noise`."""
    generator = torch.Generator().manual_seed(config.seed)
    _, H, labels = collapsed_minimizer(config.num_classes, config.feature_dim, config.samples_per_class,
                                       config.lambda_W, config.lambda_H, generator)
    rho = H[:, 0].square().sum()
    noise = torch.randn(H.shape, dtype=torch.float64, generator=generator) * config.noise * rho.sqrt()
    return H + noise / math.sqrt(config.feature_dim), labels


def central_path_check(H0, labels, num_classes, config: NcPerturbationConfig) -> list[dict[str, float]]:
    """Thm 3.1's quantities along the central path: the trace ratio, e^{2 lambda_H t} tr(Sigma_W) (non-increasing)
    and e^{2 lambda_H t} tr(Sigma_B) (increasing), with NC1."""
    times = [config.flow_time * i / (config.flow_points - 1) for i in range(config.flow_points)]
    rows = []
    for t, H in zip(times, central_path_flow(H0, labels, num_classes, config.lambda_W, config.lambda_H, times)):
        stats = ClassStatistics.from_features(H.T, labels, num_classes)
        growth = math.exp(2 * config.lambda_H * t)
        rows.append({"t": t, "nc1": nc1(stats), "trace_ratio": nc1_trace_ratio(stats),
                     "scaled_within": growth * float(stats.within_covariance.trace()),
                     "scaled_between": growth * float(stats.between_covariance.trace())})
    return rows


def _monotone(values, increasing: bool) -> bool:
    steps = [b - a for a, b in zip(values, values[1:])]
    slack = 1e-12 * max(abs(v) for v in values)
    return all(s > -slack for s in steps) if increasing else all(s < slack for s in steps)


def _plot(output_dir: Path, model_rows, synthetic_rows, spectrum, flow, layers, config) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, title in ((axes[0], model_rows, "given classifier's features"),
                            (axes[1], synthetic_rows, "collapsed minimiser + noise")):
        betas = [r["beta"] for r in rows]
        ax.plot(betas, [r["trace_ratio_H"] for r in rows], "o-", label="tr ratio of H* (Eq. 2 solved)")
        ax.plot(betas, [r["trace_ratio_first_order"] for r in rows], "x--", label="first-order prediction")
        ax.axhline(rows[0]["trace_ratio_H0"], color="grey", ls=":", label="H0")
        ax.set(xscale="log", yscale="log", xlabel="beta", ylabel="tr(Sigma_W) / tr(Sigma_B)", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "nc1_vs_beta.png", dpi=100)
    names.append("nc1_vs_beta.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in spectrum:
        lam, m, p = row["lambda_H"], row["measured"], row["predicted"]
        line, = ax.plot([lam], [1 - m["intra_min"]], "o")
        ax.plot([lam], [1 - p["intra_min"]], "_", ms=20, color=line.get_color())
        ax.plot([lam], [m["inter_max"]], "s", color=line.get_color())
        ax.plot([lam], [p["inter_max"]], "_", ms=20, color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="lambda_H",
           title=f"F's blocks (beta={config.spectrum_beta:g}): o 1-sigma_min(F_kk), s sigma_max(F_kk'); - Thm 4.2")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(output_dir / "first_order_map_spectrum.png", dpi=100)
    names.append("first_order_map_spectrum.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ts = [r["t"] for r in flow]
    axes[0].plot(ts, [r["trace_ratio"] for r in flow], label="tr ratio")
    axes[0].plot(ts, [r["nc1"] for r in flow], label="NC1")
    axes[0].set(yscale="log", xlabel="t", title="central path (Eq. 4)")
    axes[0].legend()
    axes[1].plot(ts, [r["scaled_within"] for r in flow], label="e^{2 lambda_H t} tr(Sigma_W)")
    axes[1].plot(ts, [r["scaled_between"] for r in flow], label="e^{2 lambda_H t} tr(Sigma_B)")
    axes[1].set(yscale="log", xlabel="t", title="Thm 3.1")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(output_dir / "central_path.png", dpi=100)
    names.append("central_path.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    depth = list(range(1, len(layers) + 1))
    ax.plot(depth, [r["nc1"] for r in layers], "o-", label="NC1")
    ax.plot(depth, [r["nc1_trace_ratio"] for r in layers], "s-", label="tr ratio")
    ax.set(yscale="log", xlabel="hidden layers", title="layer-wise MLP on digits (Fig. 2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "layerwise_nc1.png", dpi=100)
    names.append("layerwise_nc1.png")
    plt.close("all")
    return names


def _g(value: float) -> str:
    return f"{value:.4g}"


class NcPerturbationRunner(Runner):
    """Reads `--model` (an image classifier) and reports; figures (PNG) go into the output folder, and
    `hfpapers.runs.run` writes results.json and the report README from the returned `RunResult`."""

    config_class = NcPerturbationConfig

    def run(self, config: NcPerturbationConfig, model: str, datasets, output_dir: Path, **options) -> RunResult:
        from accelerate import PartialState
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from ... import data

        processor = AutoImageProcessor.from_pretrained(str(model))
        classifier = AutoModelForImageClassification.from_pretrained(str(model))
        split = datasets[config.split]
        subset = split.select(range(min(config.num_examples, len(split))))
        features, labels = classifier_features(classifier, processor, subset, config.batch_size)
        num_classes = classifier.config.num_labels
        model_rows = beta_sweep(features.T, labels, num_classes, config)

        H0, synthetic_labels = synthetic_H0(config)
        synthetic_rows = beta_sweep(H0, synthetic_labels, config.num_classes, config)
        spectrum = spectrum_check(config)
        flow = central_path_check(H0, synthetic_labels, config.num_classes, config)

        digits = data.load("digits")["train"]
        X, digit_labels = image_matrix(digits)
        layers = train_layerwise_mlp(
            X, digit_labels, 10, layers=config.layerwise_layers, width=config.layerwise_width,
            epochs=config.layerwise_epochs, learning_rate=config.layerwise_learning_rate,
            weight_decay=config.layerwise_weight_decay, loss=config.layerwise_loss, seed=config.seed)

        figures = []
        if PartialState().is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            figures = _plot(output_dir, model_rows, synthetic_rows, spectrum, flow, layers, config)
        return self._result(config, model, len(subset), features.shape[1], model_rows, synthetic_rows, spectrum,
                            flow, layers, figures)

    @staticmethod
    def _result(config, model, num_examples, dim, model_rows, synthetic_rows, spectrum, flow, layers,
                figures) -> RunResult:
        largest = model_rows[-1]
        sweep_columns = ["beta", "NC1(H0)", "NC1(H*)", "tr ratio H0", "tr ratio H* (measured)",
                         "tr ratio, first order (predicted)", "H* below H0"]

        def sweep(rows):
            return [[_g(r["beta"]), _g(r["nc1_H0"]), _g(r["nc1_H"]), _g(r["trace_ratio_H0"]), _g(r["trace_ratio_H"]),
                     _g(r["trace_ratio_first_order"]), "yes" if r["trace_ratio_H"] < r["trace_ratio_H0"] else "no"]
                    for r in rows]

        spectrum_rows, errors = [], []
        for row in spectrum:
            m, p = row["measured"], row["predicted"]
            errors += [abs((1 - m["intra_min"]) / (1 - p["intra_min"]) - 1), abs(m["inter_max"] / p["inter_max"] - 1)]
            spectrum_rows.append([_g(row["lambda_H"]), f"{m['intra_max']:.6f} / {p['intra_max']:.6f}",
                                  f"{m['intra_min']:.6f} / {p['intra_min']:.6f}",
                                  f"{m['inter_max']:.4e} / {p['inter_max']:.4e}", f"{m['inter_second']:.1e} / 0"])
        theorem_3_1 = {"trace ratio decreases": _monotone([r["trace_ratio"] for r in flow], False),
                       "e^{2 lambda_H t} tr(Sigma_W) decreases": _monotone([r["scaled_within"] for r in flow], False),
                       "e^{2 lambda_H t} tr(Sigma_B) increases": _monotone([r["scaled_between"] for r in flow], True)}
        metrics = {  # the headline first: Theorem 4.2's closed forms, checked
            "theorem_4_2_max_relative_error": max(errors),
            "nc1_ratio_largest_beta": largest["nc1_H"] / largest["nc1_H0"],
            "trace_ratio_ratio_largest_beta": largest["trace_ratio_H"] / largest["trace_ratio_H0"],
            "central_path_trace_ratio_end": flow[-1]["trace_ratio"] / flow[0]["trace_ratio"],
            "layerwise_nc1_first": layers[0]["nc1"],
            "layerwise_nc1_last": layers[-1]["nc1"],
        }
        tables = [
            Table("Eq. 2 on the given classifier's penultimate features", sweep_columns, sweep(model_rows),
                  f"H0 = the {dim}-d input of the classification head on {num_examples} {config.split} examples; "
                  f"lambda_W = {config.lambda_W:.4g}, lambda_H = {config.lambda_H:.4g}. Cor. 3.2: NC1 of H* is below "
                  "that of H0 for large beta; the predicted column is the explicit step H0 - (1/beta) N grad L(H0)."),
            Table("Eq. 2 on Thm 2.1's collapsed minimiser plus within-class noise", sweep_columns,
                  sweep(synthetic_rows),
                  f"K = {config.num_classes}, d = {config.feature_dim}, n = {config.samples_per_class}, noise "
                  f"{config.noise:g} of the class means' norm."),
            Table(f"F's block singular values (measured / Thm 4.2), beta = {config.spectrum_beta:g}, "
                  f"lambda_W = {config.lambda_W:.4g}",
                  ["lambda_H", "sigma_max(F_kk)", "sigma_min(F_kk)", "sigma_max(F_kk')", "sigma_2(F_kk') (rank 1)"],
                  spectrum_rows,
                  "F from the exact Hessian of Eq. 2 (Thm 4.1's Schur complement); Thm 4.2 is first order in "
                  f"1/beta: largest relative error of 1 - sigma_min and sigma_max(F_kk') {max(errors):.2e}."),
            Table("Central path from the noisy minimiser (Thm 3.1)", ["t", "NC1", "tr ratio",
                                                                      "e^{2 lambda_H t} tr Sigma_W",
                                                                      "e^{2 lambda_H t} tr Sigma_B"],
                  [[_g(r["t"]), _g(r["nc1"]), _g(r["trace_ratio"]), _g(r["scaled_within"]), _g(r["scaled_between"])]
                   for r in flow[:: max(1, (len(flow) - 1) // 5)]],
                  "Thm 3.1 (predicted / measured): " + "; ".join(f"{k}: yes / {'yes' if v else 'no'}"
                                                                 for k, v in theorem_3_1.items()) + "."),
            Table("Layer-wise MLP on the embedded digits (paper §5, Fig. 2)",
                  ["hidden layers", "NC1", "tr ratio", "train accuracy"],
                  [[i + 1, _g(r["nc1"]), _g(r["nc1_trace_ratio"]), f"{r['accuracy']:.3f}"]
                   for i, r in enumerate(layers)],
                  f"width {config.layerwise_width}, {config.layerwise_epochs} full-batch Adam steps per layer "
                  f"({config.layerwise_loss}); the paper's prediction: NC1 decreases as layers are added."),
        ]
        return RunResult(
            summary=(f"The perturbation model of neural collapse (Eq. 2) on {model}'s penultimate features, Thm 4.2's "
                     "first-order map on the collapsed minimiser, Thm 3.1's central path, and a layer-wise MLP on "
                     "digits."),
            metrics=metrics, tables=tables,
            usage=("```python\nfrom hfpapers.methods.nc_perturbation import solve_perturbation_model, "
                   "first_order_map\n```"),
            details={"beta_sweep": model_rows, "synthetic_beta_sweep": synthetic_rows, "spectrum": spectrum,
                     "central_path": flow, "theorem_3_1": theorem_3_1, "layerwise": layers, "figures": figures})
