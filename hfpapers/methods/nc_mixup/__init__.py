"""Pushing Boundaries: Mixup's Influence on Neural Collapse (Fisher, Meng and Papyan, ICLR 2024, arXiv 2402.06171).

An analysis (`hfpapers run nc-mixup --model ...`): last-layer features of mixed training pairs of a given image
classifier, projected onto the plane of three class weights and coloured by lambda (the paper's Fig. 1), and the
paper's fixed simplex-ETF classifier trained with mixup on the embedded digits, measured against the optimum of the
unconstrained features model: same-class mixes aligned with their class weight whatever lambda, different-class
mixes on the decision boundary at lambda = 1/2. The mixup / CutMix collator itself is `hfpapers.augment.MixupCutmix`.
"""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.nc_mixup"

RECORD = MethodRecord(
    slug="nc-mixup",
    kind="analysis",
    title="Pushing Boundaries: Mixup's Influence on Neural Collapse",
    arxiv_id="2402.06171",
    authors="Quinn LeBlanc Fisher, Haoming Meng, Vardan Papyan",
    year=2024,
    task="image-classification",
    config_class=f"{_MODULE}.config.NcMixupConfig",
    model_classes={},
    runner=f"{_MODULE}.runner.NcMixupRunner",
    presets={
        # The zoo's run (~30 s on 2 cores): fewer pairs, a narrower extractor and 60 epochs of the same schedule.
        "fast": Preset({"num_examples": 1000, "num_pairs": 300, "hidden_size": 128, "num_epochs": 60,
                        "pairs_per_lambda": 100},
                       description="CPU-sized: 300 pairs per kind, a 128-wide extractor trained for 60 epochs with "
                                   "the paper's optimiser, schedule shape and alpha"),
        "paper-fixed-etf": Preset({}, description="the paper's protocol: alpha = 1, training data in train mode, SGD "
                                                  "0.1 / momentum 0.9 / weight decay 1e-4 for 500 epochs, rate / 10 at "
                                                  "30, 50 and 90 %"),
    },
    default_preset="fast",
    paper_presets=("paper-fixed-etf",),
    base_method="scaling-mlp",
    dataset="shapes",
    dataset_kwargs={"resolution": 16, "num_train": 8000, "num_test": 1000},
    official_code="https://arxiv.org/abs/2402.06171",
    license="CC-BY-4.0",
    weights_license="no weights released",
    bibtex="""@inproceedings{fisher2024pushing,
  title     = {Pushing Boundaries: Mixup's Influence on Neural Collapse},
  author    = {Fisher, Quinn LeBlanc and Meng, Haoming and Papyan, Vardan},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024}
}""",
    time_budget_s=15,
    # [paper] abstract, Fig. 1 and §3 (qualitative: the paper reports its findings as figures).
    paper_results={
        "WideResNet-40-10 / ViT on CIFAR-10, CIFAR-100, FashionMNIST, ... (Fig. 1), same-class mixes":
            "last-layer features align with their class's classifier row (a simplex ETF)",
        "same, different-class mixes": "channels along the decision boundary between the two classes, "
                                       "not convex combinations of the class means",
        "UFM with the mixup loss and a simplex-ETF classifier (§3)":
            "optimal same-class features independent of lambda and aligned with w_c; different-class features "
            "linear combinations of w_c and w_c' depending on lambda",
        "fixed simplex-ETF classifier": "features closer to the theoretical optimum without loss of accuracy",
    },
)

# Exports load lazily: `import hfpapers` discovers method packages and must not import torch.
__getattr__ = lazy_exports(__name__, {
    "config": ("NcMixupConfig", "SPLITS", "OPTIMIZERS"),
    "geometry": ("plane_projection", "readout", "optimal_mixup_logits", "scale_from_margin", "fixed_etf_head"),
    "experiments": ("draw_pairs", "crossing_lambda", "mixed_pairs", "pair_report",
                    "classifier_mixup", "FixedETFNetwork", "train_fixed_etf", "fixed_etf_mixup"),
    "runner": ("NcMixupRunner", "report"),
})
