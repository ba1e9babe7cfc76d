"""`hfpapers run nc-mixup`: mixup's last-layer geometry (Fisher, Meng and Papyan, ICLR 2024).

    hfpapers run nc-mixup --model path/or/hub-id --output-dir out/ [--preset paper-fixed-etf]

(a) The given classifier: features at its head's input for mixed training pairs of three classes (lambda ~
Beta(alpha, alpha)), projected onto the plane of the three class weights as in the paper's Fig. 1 and coloured by
lambda; per lambda bin, the cosine of same-class mixes with their class weight and the logit gap of different-class
mixes. (b) The paper's fixed simplex-ETF classifier: an MLP trained with mixup on the embedded digits against a
frozen ETF head, measured on a lambda grid against the optimum of the unconstrained features model (`geometry`).
PNG plots go next to results.json.
"""

from __future__ import annotations

from pathlib import Path

from ...runs import RunResult, Runner, Table
from .config import NcMixupConfig

__all__ = ["NcMixupRunner", "report"]


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _plot_projection(pairs: dict, names: list[str], title: str, path: Path) -> None:
    """Fig. 1's picture: same-class and different-class mixes on the plane of three class weights (drawn in black),
    coloured by lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    vertices = pairs["vertices"]
    reach = max(max(abs(c) for point in pairs["projection"][k]["points"] for c in point) for k in ("same", "different"))
    scale = reach / max(max(abs(c) for c in v) for v in vertices)
    for ax, kind in zip(axes, ("same", "different")):
        points = pairs["projection"][kind]
        xs, ys = zip(*points["points"])
        dots = ax.scatter(xs, ys, c=points["lam"], cmap="viridis", vmin=0, vmax=1, s=6, alpha=0.7)
        for (vx, vy), name in zip(vertices, names):
            ax.plot([0, scale * vx], [0, scale * vy], color="black", lw=1.5)
            ax.annotate(name, (scale * vx, scale * vy), fontsize=9, ha="center", va="bottom")
        ax.set_aspect("equal")
        ax.set_title(f"{'same-class' if kind == 'same' else 'different-class'} mixes")
    fig.colorbar(dots, ax=axes, label="λ (weight of the first example)", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_lambda(etf: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [r["lambda"] for r in etf["same"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(lam, [r["mean_cosine"] for r in etf["same"]], "o-", label="class means")
    axes[0].plot(lam, [r["cosine"] for r in etf["same"]], "s-", label="single mixes")
    axes[0].plot(lam, [1.0] * len(lam), "k--", label="UFM optimum")
    axes[0].set(xlabel="λ", title="same class: cos(h, w_c)", ylim=(0, 1.05))
    axes[1].plot(lam, [r["relative_norm"] for r in etf["same"]], "o-", label="measured")
    axes[1].plot(lam, [1.0] * len(lam), "k--", label="UFM optimum")
    axes[1].set(xlabel="λ", title="same class: ‖h‖ / its mean over λ")
    axes[2].plot(lam, [r["gap"] for r in etf["different"]], "o-", label="measured")
    axes[2].plot(lam, [r["predicted_gap"] for r in etf["different"]], "k--", label="UFM optimum")
    axes[2].axhline(0, color="grey", lw=0.5)
    axes[2].axvline(0.5, color="grey", lw=0.5)
    axes[2].set(xlabel="λ (weight of class c)", title="different classes: z_c - z_c'")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(classifier: dict | None, etf: dict, model: str) -> RunResult:
    """The run's tables: measured vs the UFM optimum's prediction, per lambda and per claim."""
    tables = [Table(
        "Fixed simplex-ETF classifier: mixed training pairs vs the UFM optimum",
        ["λ", "same: cos(class mean, w_c)", "same: cos(h, w_c)", "predicted", "same: ‖h‖ / mean", "predicted",
         "different: z_c - z_c'", "predicted", "different: share in span{w_c, w_c'}", "predicted"],
        [[f"{s['lambda']:.2f}", _fmt(s["mean_cosine"]), _fmt(s["cosine"]), "1", _fmt(s["relative_norm"]), "1",
          _fmt(d["gap"], 2), _fmt(d["predicted_gap"], 2), _fmt(d["in_span"]), "1"]
         for s, d in zip(etf["same"], etf["different"])],
        f"An MLP trained with mixup (α from the config) on {etf['num_train']} embedded digits against a frozen "
        f"simplex-ETF head (train / test accuracy {etf['accuracy']['train']:.3f} / {etf['accuracy']['test']:.3f}). "
        "h is the part of the feature the head reads (its projection on the head's row space); λ is the weight of "
        "class c; cos(class mean, w_c) averages each class's mixes first (as neural collapse measures alignment), "
        "cos(h, w_c) is the mean over single mixes. The predicted gap is the UFM optimum z = c (y - softmax(z)) "
        "with c fitted to the measured "
        f"same-class logit margin ({etf['margin']:.2f}, c = {etf['scale']:.1f}); the UFM also predicts same-class "
        "features aligned with w_c whatever λ, and different-class features in span{w_c, w_c'}, on the decision "
        "boundary at λ = 0.5. Plots: fixed_etf_lambda.png, fixed_etf_projection.png.")]
    claims = [
        ["fixed ETF: same-class cos(class mean, w_c), mean over λ", _fmt(etf["same_mean_cosine_mean"]), "1"],
        ["fixed ETF: same-class cos(class mean, w_c), max - min over λ", _fmt(etf["same_mean_cosine_spread"]), "0"],
        ["fixed ETF: same-class cos(h, w_c) of single mixes, mean over λ", _fmt(etf["same_cosine_mean"]), "1"],
        ["fixed ETF: same-class ‖h‖ / mean, max - min over λ", _fmt(etf["same_norm_spread"]), "0"],
        ["fixed ETF: different-class gap z_c - z_c' at λ = 0.5", _fmt(etf["different_gap_at_half"]), "0"],
        ["fixed ETF: λ where the gap crosses 0 (line fit)", _fmt(etf["different_crossing_lambda"]), "0.5"],
        ["fixed ETF: different-class share in span{w_c, w_c'}", _fmt(etf["different_in_span_mean"]), "1"],
        ["fixed ETF: max deviation of the gap from the UFM gap over λ", _fmt(etf["different_gap_error"]), "0"],
    ]
    metrics = {"etf_same_cosine": etf["same_mean_cosine_mean"],
               "etf_same_cosine_spread": etf["same_mean_cosine_spread"],
               "etf_same_norm_spread": etf["same_norm_spread"],
               "etf_crossing_lambda": etf["different_crossing_lambda"],
               "etf_in_span": etf["different_in_span_mean"], "etf_test_accuracy": etf["accuracy"]["test"]}
    if classifier is not None:
        names = ", ".join(classifier["class_names"])
        claims += [
            ["given classifier: same-class cos(h, w_c) of single mixes, mean", _fmt(classifier["same_cosine_mean"]),
             "1"],
            ["given classifier: correlation of that cosine with λ", _fmt(classifier["same_cosine_lambda_correlation"]),
             "0"],
            ["given classifier: λ where z_c - z_c' crosses 0", _fmt(classifier["different_crossing_lambda"]), "0.5"],
        ]
        tables.append(Table(
            "The given classifier: mixed training pairs of three classes, by λ",
            ["λ", "pairs (same / different)", "same: cos(h, w_c)", "same: ‖h‖", "different: z_c - z_c'"],
            [[b["lambda"], f"{b['pairs'][0]} / {b['pairs'][1]}", _fmt(b["same_cosine"]), _fmt(b["same_norm"], 2),
              _fmt(b["different_gap"], 2)] for b in classifier["bins"]],
            f"Classes {names}; pairs drawn from the first {classifier['num_examples']} examples, λ ~ Beta(α, α), "
            f"features at the head's input read in {'train' if classifier['train_mode'] else 'eval'} mode (as the "
            "paper does); h and w_c as the head reads them (rows centred, h projected on their span). The paper's "
            "finding: the cosine does not move with λ, and the gap changes sign at λ = 0.5. "
            "Plot: classifier_projection.png."))
        metrics.update({"classifier_same_cosine": classifier["same_cosine_mean"],
                        "classifier_crossing_lambda": classifier["different_crossing_lambda"]})
    tables.insert(0, Table("The paper's claims, measured vs predicted", ["claim", "measured", "predicted"], claims,
                           "Predicted: the optimum of the unconstrained features model under the mixup loss with a "
                           "simplex-ETF classifier (paper §3)."))
    return RunResult(
        summary=(f"Mixup's last-layer geometry: features of mixed training pairs of {model}, projected onto the plane "
                 "of three class weights as in the paper's Fig. 1, and the paper's fixed simplex-ETF classifier "
                 "trained with mixup on digits, measured against the optimum of the unconstrained features model."),
        metrics=metrics, tables=tables,
        details={"classifier": classifier, "fixed_etf": etf})


class NcMixupRunner(Runner):
    """Measures `--model` on mixed pairs, trains and measures the fixed-ETF network; writes the plots."""

    config_class = NcMixupConfig

    def run(self, config: NcMixupConfig, model: str, datasets, output_dir: Path, **options) -> RunResult:
        from accelerate import PartialState
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from .experiments import classifier_mixup, fixed_etf_mixup

        if config.split not in datasets:
            raise ValueError(f"the dataset has no {config.split!r} split; splits: {list(datasets)}")
        classifier = classifier_mixup(AutoModelForImageClassification.from_pretrained(model, use_safetensors=True),
                                      AutoImageProcessor.from_pretrained(model), datasets[config.split], config)
        etf = fixed_etf_mixup(config)
        if PartialState().is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            _plot_projection(classifier, classifier["class_names"], f"{model}: features of mixed training pairs",
                             output_dir / "classifier_projection.png")
            _plot_projection(etf["pairs"], [str(c) for c in etf["pairs"]["classes"]],
                             "fixed simplex-ETF head, digits", output_dir / "fixed_etf_projection.png")
            _plot_lambda(etf, output_dir / "fixed_etf_lambda.png")
        return report(classifier, etf, model)
