"""`hfpapers run nc-deep-linear`: neural collapse of a given classifier, of the deep linear UFM and of an MLP with a
deep linear head.

    hfpapers run nc-deep-linear --model path/or/hub-id --output-dir out/ [--preset ufm-imbalanced-M3]

(a) the NC metrics of `--model` on the dataset's `split` (per hidden layer, and for its head against the frame its
bias calls for); (b) the paper's synthetic experiment: H and W_1..W_M optimised directly, balanced and imbalanced,
measured against the predicted geometry (NC metrics and closed-form norms, minority collapse); (c) an MLP with a deep
linear head trained on the embedded digits, NC measured after every epoch. PNG plots go next to results.json.
"""

from __future__ import annotations

from pathlib import Path

from ...runs import RunResult, Runner, Table
from .config import NcDeepLinearConfig

__all__ = ["NcDeepLinearRunner"]

_CURVE_METRICS = ("nc1", "nc2_w", "nc2_h", "nc3")


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _plot_ufm(arms: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in _CURVE_METRICS if all(m in r for arm in arms for r in arm["curve"])]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for arm in arms:
            label = f"{arm['arm']} {arm['loss'].upper()}{' +b' if arm['bias'] else ''} M={arm['depth']}"
            ax.semilogy([r["iteration"] for r in arm["curve"]], [max(r[name], 1e-12) for r in arm["curve"]],
                        label=label)
        ax.set(xlabel="iteration", title=name.upper().replace("_", " "))
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_norms(arms: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_norms = [a for a in arms if "measured_norms" in a and len(set(a["counts"])) > 1]
    fig, axes = plt.subplots(1, len(with_norms), figsize=(4 * len(with_norms), 3.4), squeeze=False)
    for ax, arm in zip(axes[0], with_norms):
        k = range(len(arm["counts"]))
        ax.bar([i - 0.2 for i in k], arm["measured_norms"]["weight"], 0.4, label="measured ||w_k||")
        ax.bar([i + 0.2 for i in k], arm["predicted_norms"]["weight"], 0.4, label="closed form")
        ax.set_xticks(list(k), [f"n={n}" for n in arm["counts"]])
        ax.set(title=f"{arm['arm']}, M={arm['depth']}, λ={arm['weight_decay']:g}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_digits(digits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = digits["curve"]
    fig, axes = plt.subplots(1, len(_CURVE_METRICS), figsize=(16, 3.4))
    for ax, name in zip(axes, _CURVE_METRICS):
        for m in range(digits["depth_linear"]):
            ax.semilogy([r["epoch"] for r in curve], [max(r["layers"][m][name], 1e-12) for r in curve],
                        label=f"input of W_{m + 1}")
        ax.set(xlabel="epoch", title=name.upper().replace("_", " "))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(classifier: dict | None, arms: list[dict], digits: dict, model: str) -> RunResult:
    """The run's tables: measured vs predicted, per arm and per class."""
    tables = []
    if classifier is not None:
        tables.append(Table(
            "The given classifier", ["features", "NC1", "NC1 (trace ratio)", "NC2 W", "NC2 H", "NC3"],
            [[f"hidden state {r['layer']}", _fmt(r["nc1"]), _fmt(r["nc1_trace_ratio"]), "", "", ""]
             for r in classifier["per_layer"]]
            + [["input of the head", _fmt(classifier["head"].get("nc1")),
                _fmt(classifier["head"].get("nc1_trace_ratio")), _fmt(classifier["head"].get("nc2_w")),
                _fmt(classifier["head"].get("nc2_h")), _fmt(classifier["head"].get("nc3"))]],
            f"On {classifier['num_examples']} examples; NC2/NC3 against the {classifier['frame']} (the frame the "
            "head's bias calls for, etf = simplex ETF). Perfect collapse is 0."))
    tables.append(Table(
        "UFM: NC metrics at the last iterate, predicted 0",
        ["arm", "loss", "bias", "M", "target frame", "NC1", "NC2 W", "NC2 H", "NC3", "objective"],
        [[a["arm"], a["loss"].upper(), "yes" if a["bias"] else "no", a["depth"], a["frame"],
          _fmt(a["layers"][0].get("nc1")), _fmt(a["layers"][0].get("nc2_w")), _fmt(a["layers"][0].get("nc2_h")),
          _fmt(a["layers"][0].get("nc3")), _fmt(a["objective"])] for a in arms],
        "Features H against the product W_M..W_1. The paper predicts every entry 0 at the global optimum: the "
        "orthogonal frame (balanced, MSE, no bias), the simplex ETF (with a bias, or CE) and the general orthogonal "
        "frame whose lengths come from the closed form (imbalanced)."))
    norm_rows = []
    for a in arms:
        if "measured_norms" not in a:
            continue
        for k, n_k in enumerate(a["counts"]):
            norm_rows.append([f"{a['arm']}, M={a['depth']}, λ={a['weight_decay']:g}", n_k,
                              _fmt(a["measured_norms"]["weight"][k]), _fmt(a["predicted_norms"]["weight"][k]),
                              _fmt(a["measured_norms"]["feature"][k]), _fmt(a["predicted_norms"]["feature"][k]),
                              ("yes" if a["predicted_collapsed"][k] else "no") if "predicted_collapsed" in a else "",
                              ("yes" if a["measured_collapsed"][k] else "no") if "measured_collapsed" in a else ""])
    tables.append(Table(
        "UFM: learned norms vs the closed form (MSE, no bias)",
        ["arm", "n_k", "||w_k|| measured", "||w_k|| predicted", "||h_k|| measured", "||h_k|| predicted",
         "collapse predicted", "collapse measured"], norm_rows,
        "w_k: row k of W_M..W_1 (predicted s_k^M), h_k: class-k mean of H (predicted s_k^M / (s_k^2M + N λ_H)). "
        "Minority collapse (M = 1): class k collapses iff n_k <= N^2 λ_W λ_H; measured as ||w_k|| below 5 % of "
        "the largest row."))
    last = digits["curve"][-1]
    tables.append(Table(
        "MLP with a deep linear head on digits, last epoch",
        ["features", "NC1", "NC2 W", "NC2 H", "NC3"],
        [[f"input of W_{m + 1}", *(_fmt(layer.get(k)) for k in _CURVE_METRICS)]
         for m, layer in enumerate(last["layers"])],
        f"{len(digits['curve'])} epochs on {digits['num_train']} training digits, test accuracy "
        f"{last['test_accuracy']:.3f}; every layer's input against its partial product W_M..W_m (simplex ETF: the "
        "classifier has a bias). Curves per epoch: digits_nc.png."))
    mse_free = [a for a in arms if "norm_error" in a and a["arm"] != "minority collapse"]
    minority = [a for a in arms if a["arm"] == "minority collapse"]
    metrics = {}
    if mse_free:  # the headline: the closed form's prediction, checked (largest relative error of the norms)
        metrics["ufm_norm_error"] = max(a["norm_error"] for a in mse_free)
    metrics["ufm_max_nc1"] = max(a["layers"][0]["nc1"] for a in arms)
    if minority:
        metrics["minority_collapse_agreement"] = float(
            minority[0]["predicted_collapsed"] == minority[0]["measured_collapsed"])
    metrics["digits_nc1"] = last["layers"][-1]["nc1"]
    if classifier is not None:
        metrics["classifier_nc1"] = classifier["head"]["nc1"]
    return RunResult(
        summary=(f"Neural-collapse metrics of {model}, and the paper's deep linear unconstrained features model "
                 f"solved directly ({len(arms)} arms) against its predicted geometry, and an MLP with a deep "
                 "linear head trained on digits. Plots: ufm_nc.png, ufm_norms.png, digits_nc.png."),
        metrics=metrics, tables=tables,
        details={"classifier": classifier, "ufm": arms, "digits": digits})


class NcDeepLinearRunner(Runner):
    """Measures `--model`, solves the UFM arms and trains the digits MLP; writes the plots into the output folder."""

    config_class = NcDeepLinearConfig

    def run(self, config: NcDeepLinearConfig, model: str, datasets, output_dir: Path, **options) -> RunResult:
        from accelerate import PartialState
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from .experiments import classifier_collapse, digits_collapse, ufm_arms

        if config.split not in datasets:
            raise ValueError(f"the dataset has no {config.split!r} split; splits: {list(datasets)}")
        classifier = classifier_collapse(AutoModelForImageClassification.from_pretrained(model),
                                         AutoImageProcessor.from_pretrained(model), datasets[config.split], config)
        arms = ufm_arms(config)
        digits = digits_collapse(config)
        if PartialState().is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            _plot_ufm(arms, output_dir / "ufm_nc.png")
            _plot_norms(arms, output_dir / "ufm_norms.png")
            _plot_digits(digits, output_dir / "digits_nc.png")
        return report(classifier, arms, digits, model)
