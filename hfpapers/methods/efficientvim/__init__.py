"""EfficientViM: Efficient Vision Mamba with Hidden State Mixer based State Space Duality
(Lee, Choi, Kim; CVPR 2025, arXiv 2411.15241)."""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.efficientvim"

_M = {
    "M1": {"embed_dim": [128, 192, 320], "depths": [2, 2, 2], "state_dim": [49, 25, 9], "image_size": 224},
    "M2": {"embed_dim": [128, 256, 512], "depths": [2, 2, 2], "state_dim": [49, 25, 9], "image_size": 224},
    "M3": {"embed_dim": [224, 320, 512], "depths": [2, 2, 2], "state_dim": [49, 25, 9], "image_size": 224},
    "M4": {"embed_dim": [224, 320, 512], "depths": [3, 4, 2], "state_dim": [64, 32, 16], "image_size": 256},
}
# tiny: 96 px, so that the last stage still has a 2x2 grid (at 64 px it would mix a single token).
_PRESETS = {"tiny": {"embed_dim": [32, 48, 64], "depths": [1, 1, 1], "state_dim": [16, 9, 4], "image_size": 96}}
for _name, _values in _M.items():
    _PRESETS[_name] = {**_values, "num_labels": 1000}
    _PRESETS[f"{_name}-dist"] = {**_values, "num_labels": 1000, "distillation": True}

# The paper's training arguments (the recipe's fields hold the rest of the official recipe).
_PAPER_TRAINING = {"learning_rate": 2e-3, "weight_decay": 0.05, "per_device_train_batch_size": 256, "num_epochs": 310,
                   "max_grad_norm": 0.02, "ema_decay": 0.9995}
# The CPU-sized preset: 3,000 small images and a few minutes are too little for batch mixing and erasing to pay
# off, so they are off; the rest of the recipe (EMA, MESA, schedule shape, AdamW groups) is kept.
_TINY_TRAINING = {**_PAPER_TRAINING, "learning_rate": 4e-3, "per_device_train_batch_size": 64, "num_epochs": 15,
                  "warmup_epochs": 1, "cooldown_epochs": 1, "ema_decay": 0.99, "max_grad_norm": 1.0,
                  "crop_scale": (0.35, 1.0), "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "random_erasing": 0.0}

RECORD = MethodRecord(
    slug="efficientvim",
    title="EfficientViM: Efficient Vision Mamba with Hidden State Mixer based State Space Duality",
    arxiv_id="2411.15241",
    authors="Sanghyeok Lee, Joonmyung Choi, Hyunwoo J. Kim",
    year=2025,
    task="image-classification",
    config_class=f"{_MODULE}.configuration_efficientvim.EfficientViMConfig",
    model_classes={
        "AutoModel": f"{_MODULE}.modeling_efficientvim.EfficientViMModel",
        "AutoModelForImageClassification": f"{_MODULE}.modeling_efficientvim.EfficientViMForImageClassification",
    },
    processor=f"{_MODULE}.image_processing_efficientvim.build_image_processor",
    presets={name: Preset(values, _TINY_TRAINING if name == "tiny" else _PAPER_TRAINING)
             for name, values in _PRESETS.items()},
    default_preset="tiny",
    paper_presets=("M1", "M2", "M3", "M4"),
    dataset="shapes",
    dataset_kwargs={"resolution": 96, "num_train": 2400, "num_test": 600},
    recipe=f"{_MODULE}.recipe.EfficientViMRecipe",
    converter=f"{_MODULE}.convert_efficientvim",
    official_code="https://github.com/mlvlab/EfficientViM",
    license="MIT",
    weights_license="MIT (official repository)",
    bibtex="""@inproceedings{lee2025efficientvim,
  title     = {{EfficientViM}: Efficient Vision Mamba with Hidden State Mixer based State Space Duality},
  author    = {Lee, Sanghyeok and Choi, Joonmyung and Kim, Hyunwoo J.},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025}
}""",
    time_budget_s=120,
    paper_results={
        "M1, ImageNet-1k top-1, 300 epochs (450 / distilled)": "72.9 (73.5 / 74.6)",
        "M2, ImageNet-1k top-1, 300 epochs (450 / distilled)": "75.4 (75.8 / 76.7)",
        "M3, ImageNet-1k top-1, 300 epochs (450 / distilled)": "77.6 (77.9 / 79.1)",
        "M4, ImageNet-1k top-1 at 256 px, 300 epochs (450 / distilled)": "79.4 (79.6 / 80.7)",
    },
)


# Exports load lazily: the record above must stay importable without torch.
__getattr__ = lazy_exports(__name__, {
    "configuration_efficientvim": ("EfficientViMConfig",),
    "modeling_efficientvim": ("EfficientViMModel", "EfficientViMForImageClassification",
                              "EfficientViMPreTrainedModel", "HiddenStateMixerSSD", "EfficientViMBlock",
                              "PatchMerging",),
})
