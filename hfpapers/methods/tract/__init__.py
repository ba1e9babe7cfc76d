"""TrAct: Making First-layer Pre-Activations Trainable (Petersen, Borgelt, Ermon; NeurIPS 2024, arXiv 2410.23970).

A procedure on a given image classifier (`hfpapers run tract --model ...`): its first layer (convolution, patch
embedding or linear) trains with TrAct's closed-form weight gradient, next to the same training without it; the
TrAct model, the accuracy curves and the epochs saved are written. `apply_tract(model, l)` does it for any
training loop, and `hfpapers train <method> --tract` for every registered image method.
"""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.tract"

RECORD = MethodRecord(
    slug="tract",
    kind="procedure",
    title="TrAct: Making First-layer Pre-Activations Trainable",
    arxiv_id="2410.23970",
    authors="Felix Petersen, Christian Borgelt, Stefano Ermon",
    year=2024,
    task="image-classification",
    config_class=f"{_MODULE}.config.TractConfig",
    model_classes={},
    runner=f"{_MODULE}.runner.TractRunner",
    presets={
        # The zoo's run: the zoo's Scaling MLP architecture retrained from scratch on its 16-px shapes, both arms.
        "tiny": Preset({"num_epochs": 4, "optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 0.0,
                        "batch_size": 64},
                       {}, "tuned here: the zoo's Scaling MLP retrained from scratch for 4 epochs, with and without "
                           "TrAct"),
        # [paper] Fig. 3 (CIFAR-10 ResNet-18): SGD momentum 0.9, lr 0.08, batch 128, cosine schedule.
        "cifar10-resnet18-sgd": Preset({}, {}, "the paper's CIFAR-10 ResNet-18 SGD setting (Fig. 3), 100 epochs"),
        # [paper] Fig. 3: Adam, lr 1e-2 for 100 and 200 epochs (1e-3 for 400 and 800).
        "cifar10-resnet18-adam": Preset({"optimizer": "adamw", "learning_rate": 1e-2, "weight_decay": 0.0}, {},
                                        "the paper's CIFAR-10 ResNet-18 Adam setting (Fig. 3), 100 epochs"),
    },
    default_preset="tiny",
    paper_presets=("cifar10-resnet18-sgd", "cifar10-resnet18-adam"),
    base_method="scaling-mlp",
    dataset="shapes",
    dataset_kwargs={"resolution": 16, "num_train": 8000, "num_test": 1000},
    official_code="https://github.com/Felix-Petersen/tract",
    license="MIT",
    weights_license="no weights released",
    bibtex="""@inproceedings{petersen2024tract,
  title     = {{TrAct}: Making First-layer Pre-Activations Trainable},
  author    = {Petersen, Felix and Borgelt, Christian and Ermon, Stefano},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2024}
}""",
    time_budget_s=30,
    # [paper] arXiv 2410.23970: Fig. 3, Tables 1-3.
    paper_results={
        "CIFAR-10 ResNet-18, SGD: TrAct at 100 epochs vs baseline at 800 epochs": "TrAct higher (Fig. 3)",
        "CIFAR-100, 36 CNNs, 200 epochs, mean top-1 / top-5 (baseline -> TrAct)": "75.90 / 93.19 -> 76.39 / 93.42",
        "CIFAR-100, TrAct with 133 epochs vs baseline with 200, mean top-1 / top-5": "75.94 / 93.34 vs 75.90 / 93.19",
        "ImageNet ResNet-50, 60 epochs top-1 (baseline -> TrAct; baseline at 90: 75.70)": "74.98 -> 75.68",
        "ImageNet DeiT-III ViT-S, 400 epochs top-1 (baseline -> TrAct)": "81.23 -> 81.50",
        "speed-up to the baseline's accuracy": "1.25x to 4x",
    },
)

# Exports load lazily: `import hfpapers` discovers method packages and must not import torch.
__getattr__ = lazy_exports(__name__, {
    "config": ("TractConfig", "OPTIMIZERS",),
    "tract": ("apply_tract", "remove_tract", "find_first_layer", "tract_weight_gradient",
              "tract_weight_gradient_from_outputs", "TrActCallback", "SUPPORTED_LAYERS",),
    "recipe": ("TrActRecipe",),
    "runner": ("TractRunner", "accuracy_curve", "epochs_to_reach", "plot_accuracy",),
})
