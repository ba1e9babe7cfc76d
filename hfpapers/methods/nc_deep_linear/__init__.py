"""Neural Collapse in Deep Linear Networks: From Balanced to Imbalanced Data (Dang et al., ICML 2023,
arXiv 2301.00437).

An analysis (`hfpapers run nc-deep-linear --model ...`): the NC metrics of the given classifier per layer and for
the partial products of its trailing linear layers; the paper's direct optimisation of the (deep linear)
unconstrained features model, balanced and imbalanced, against the predicted geometry (orthogonal frame, simplex
ETF, the closed-form general orthogonal frame, minority collapse); and an MLP with a deep linear head on the
embedded digits with its NC curves. The report gives measured and predicted values side by side, with PNG plots.
"""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.nc_deep_linear"

# The README's imbalanced direct-optimisation runs (synthetic_experiment_imbalanced.py --num_iteration 30000
# --depth_linear M); NcDeepLinearConfig's defaults hold the rest of the official settings. d = 2048 (the README's
# --hidden) for M = 1; deeper at d = 64 (the script's default): with the official N(0, 0.1^2) initialisation the
# product of M >= 3 layers 2048 wide is so large that lr 0.1 diverges within 6 iterations, in the official code too.
_PAPER = {"num_iterations": 30000, "record_every": 500}
_PAPER_HIDDEN = {1: 2048, 3: 64, 6: 64, 9: 64}

RECORD = MethodRecord(
    slug="nc-deep-linear",
    kind="analysis",
    title="Neural Collapse in Deep Linear Networks: From Balanced to Imbalanced Data",
    arxiv_id="2301.00437",
    authors="Hien Dang, Tho Tran, Stanley Osher, Hung Tran-The, Nhat Ho, Tan Nguyen",
    year=2023,
    task="image-classification",
    config_class=f"{_MODULE}.config.NcDeepLinearConfig",
    model_classes={},
    runner=f"{_MODULE}.runner.NcDeepLinearRunner",
    presets={
        # The zoo's run (~30 s on 2 cores): a small d and fewer iterations, M = 1 and 3.
        "fast": Preset({"num_examples": 1000, "hidden": 16, "depths": (1, 3), "num_iterations": 3000,
                        "record_every": 100, "digits_epochs": 10},
                       description="CPU-sized: d = 16, 3,000 iterations, M in {1, 3}; the official lr, momentum, "
                                   "initialisation, decays and counts"),
        **{f"ufm-imbalanced-M{m}": Preset({**_PAPER, "hidden": d, "depths": (m,)},
                                          description=f"the README's imbalanced UFM run, d = {d}, M = {m}")
           for m, d in _PAPER_HIDDEN.items()},
        "ufm-balanced": Preset({"hidden": 64, "num_iterations": 30000, "depths": (1,), "record_every": 500},
                               description="the README's balanced UFM run (--hidden 64 --num_iteration 30000)"),
    },
    default_preset="fast",
    paper_presets=("ufm-balanced", "ufm-imbalanced-M1", "ufm-imbalanced-M3", "ufm-imbalanced-M6",
                   "ufm-imbalanced-M9"),
    base_method="scaling-mlp",
    dataset="shapes",
    dataset_kwargs={"resolution": 16, "num_train": 8000, "num_test": 1000},
    official_code="https://github.com/Fsoft-AIC/Neural-Collapse-in-Deep-Linear-Networks",
    license="unknown",
    weights_license="no weights released",
    bibtex="""@inproceedings{dang2023neural,
  title     = {Neural Collapse in Deep Linear Networks: From Balanced to Imbalanced Data},
  author    = {Dang, Hien and Tran, Tho and Osher, Stanley and Tran-The, Hung and Ho, Nhat and Nguyen, Tan},
  booktitle = {Proceedings of the 40th International Conference on Machine Learning (ICML)},
  year      = {2023}
}""",
    time_budget_s=60,
    # [recall — verify] the paper's figures are curves, not tables; what they show (official README settings):
    paper_results={
        "UFM, balanced, MSE, M in {1, 3, 6, 9}": "NC1, NC2, NC3 -> 0 (orthogonal frame without bias, simplex ETF "
                                                "with bias)",
        "UFM, imbalanced [200, 100, 50, 50], MSE, no bias, d = 2048": "NC1 -> 0; NC2 / NC3 -> 0 against the "
                                                                      "closed-form general orthogonal frame",
        "Minority collapse, M = 1": "class k collapses iff n_k <= N^2 lambda_W lambda_H",
        "MLP (6 ReLU + M linear layers), CIFAR-10, MSE": "NC1-NC3 decrease over training for every linear layer",
    },
)

# Exports load lazily: `import hfpapers` discovers method packages and must not import torch.
__getattr__ = lazy_exports(__name__, {
    "config": ("NcDeepLinearConfig", "LOSSES", "SPLITS"),
    "deep_linear": ("DeepLinearClassifier", "UnconstrainedFeatures"),
    "ufm": ("UFMSolution", "solve_ufm", "ufm_labels", "ufm_objective"),
})
