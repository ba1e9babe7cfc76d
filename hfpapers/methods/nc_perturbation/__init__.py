"""Perturbation Analysis of Neural Collapse (Tirer, Huang, Niles-Weed, ICML 2023, arXiv 2210.16658).

An analysis of a given image classifier (`hfpapers run nc-perturbation --model ...`): its penultimate features are
H0 of the paper's perturbation model (Eq. 2), solved for a range of beta to show NC1 falling below H0's for large
beta (Cor. 3.2); the report adds the paper's synthetic checks (the first-order map's block singular values against
Thm 4.2's closed forms, the central path against Thm 3.1) and its layer-wise MLP (§5, Fig. 2) on the embedded digits.
"""

import math

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.nc_perturbation"

RECORD = MethodRecord(
    slug="nc-perturbation",
    kind="analysis",
    title="Perturbation Analysis of Neural Collapse",
    arxiv_id="2210.16658",
    authors="Tom Tirer, Haoxiang Huang, Jonathan Niles-Weed",
    year=2023,
    task="image-classification",  # the models it reads
    config_class=f"{_MODULE}.config.NcPerturbationConfig",
    model_classes={},
    runner=f"{_MODULE}.runner.NcPerturbationRunner",
    presets={
        # The zoo's run on the zoo's Scaling MLP: 500 training examples, three added layers on digits.
        "fast": Preset({"num_examples": 500, "betas": (0.1, 1.0, 10.0, 100.0, 1000.0), "layerwise_layers": 3},
                       {}, "CPU-sized: the paper's Fig. 1 setting for the synthetic parts, 3 layer-wise layers"),
        "fig1": Preset({"spectrum_beta": 100.0, "num_classes": 4, "feature_dim": 10, "samples_per_class": 10,
                        "lambda_W": math.sqrt(2), "spectrum_lambda_H": (0.001, 0.01, 0.1, 0.3, 0.5, 0.7)}, {},
                       "the paper's Fig. 1: beta = 100, K = 4, d = 10, n = 10, lambda_W = sqrt(2); its lambda_H "
                       "values are chosen here (lambda_H lambda_W < 1)"),
        "fig2-layerwise": Preset({"layerwise_layers": 10, "layerwise_width": 128, "layerwise_epochs": 300}, {},
                                 "the paper's Fig. 2: 1 to 10 hidden layers added one at a time (CIFAR-10 there, "
                                 "the embedded digits here; width and steps chosen here)"),
    },
    default_preset="fast",
    paper_presets=("fig1", "fig2-layerwise"),
    base_method="scaling-mlp",
    dataset="shapes",
    dataset_kwargs={"resolution": 16, "num_train": 8000, "num_test": 1000},
    official_code="https://proceedings.mlr.press/v202/tirer23a.html",  # no code was released; the paper's page
    license="Apache-2.0",  # this implementation's (no official code)
    weights_license="no weights released",
    bibtex="""@inproceedings{tirer2023perturbation,
  title     = {Perturbation Analysis of Neural Collapse},
  author    = {Tirer, Tom and Huang, Haoxiang and Niles-Weed, Jonathan},
  booktitle = {Proceedings of the 40th International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {202},
  year      = {2023}
}""",
    time_budget_s=15,
    # [paper] statements (no numeric tables): Thm 3.1, Cor. 3.2, Thm 4.2, §5 Fig. 2.
    paper_results={
        "Cor. 3.2, NC1 (trace ratio) of H* vs H0": "below H0's for beta above a constant C(H0)",
        "Thm 3.1, central path": "tr(Sigma_W)/tr(Sigma_B) strictly decreases; e^{2 lambda_H t} tr(Sigma_W) "
                                 "decreases, e^{2 lambda_H t} tr(Sigma_B) increases",
        "Thm 4.2, intra-class blocks F_kk": "sigma_max = 1, sigma_min = 1 - sqrt(lambda_H / lambda_W) / beta",
        "Thm 4.2, inter-class blocks F_kk'": "rank 1, sigma_max = 2 lambda_H (1 - sqrt(lambda_H lambda_W)) / beta",
        "Fig. 2, layer-wise MLP on CIFAR-10, 1-10 hidden layers": "NC1 of the deepest features decreases per layer",
    },
)

# Exports load lazily: `import hfpapers` discovers method packages and must not import torch.
__getattr__ = lazy_exports(__name__, {
    "config": ("NcPerturbationConfig", "SPLITS", "LAYERWISE_LOSSES",),
    "perturbation": ("targets", "optimal_classifier", "perturbation_objective", "central_path_loss",
                     "central_path_velocity", "solve_perturbation_model", "PerturbationSolution", "central_path_flow",
                     "collapsed_minimizer", "first_order_map", "class_blocks", "block_singular_values",
                     "theorem_4_2",),
    "layerwise": ("image_matrix", "collapse_of", "train_layerwise_mlp",),
    "runner": ("NcPerturbationRunner", "classifier_features", "beta_sweep", "spectrum_check", "synthetic_H0",
               "central_path_check",),
})
