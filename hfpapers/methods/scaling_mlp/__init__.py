"""Scaling MLPs: A Tale of Inductive Bias (Bachmann, Anagnostidis, Hofmann; NeurIPS 2023, arXiv 2306.13575)."""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.scaling_mlp"

# The released models see 64x64 RGB images and were pre-trained on ImageNet-21k (11,230 classes); with that
# head the parameter counts equal the official README's (24.7M / 37.3M / 74.5M / 124.8M).
_PAPER = {"image_size": 64, "num_channels": 3, "expansion_factor": 4, "num_labels": 11230}

# The paper's pre-training arguments, and their CPU-sized version for the tiny preset.
_PAPER_TRAINING = {"learning_rate": 5e-5, "weight_decay": 0.0, "lr_scheduler": "constant",
                   "per_device_train_batch_size": 16384, "num_epochs": 800}
_TINY_TRAINING = {**_PAPER_TRAINING, "learning_rate": 3e-4, "per_device_train_batch_size": 64, "num_epochs": 20,
                  "lr_scheduler": "cosine", "warmup_steps": 20, "crop_scale": (0.35, 1.0)}

RECORD = MethodRecord(
    slug="scaling-mlp",
    title="Scaling MLPs: A Tale of Inductive Bias",
    arxiv_id="2306.13575",
    authors="Gregor Bachmann, Sotiris Anagnostidis, Thomas Hofmann",
    year=2023,
    task="image-classification",
    config_class=f"{_MODULE}.configuration_scaling_mlp.ScalingMLPConfig",
    model_classes={
        "AutoModel": f"{_MODULE}.modeling_scaling_mlp.ScalingMLPModel",
        "AutoModelForImageClassification": f"{_MODULE}.modeling_scaling_mlp.ScalingMLPForImageClassification",
    },
    processor=f"{_MODULE}.image_processing_scaling_mlp.build_image_processor",
    processor_class=f"{_MODULE}.image_processing_scaling_mlp.ScalingMLPImageProcessor",
    presets={
        "tiny": Preset({"image_size": 16, "num_channels": 3, "num_blocks": 2, "hidden_size": 128,
                        "expansion_factor": 4}, _TINY_TRAINING),
        "B_6-Wi_512": Preset({**_PAPER, "num_blocks": 6, "hidden_size": 512}, _PAPER_TRAINING),
        "B_12-Wi_512": Preset({**_PAPER, "num_blocks": 12, "hidden_size": 512}, _PAPER_TRAINING),
        "B_6-Wi_1024": Preset({**_PAPER, "num_blocks": 6, "hidden_size": 1024}, _PAPER_TRAINING),
        "B_12-Wi_1024": Preset({**_PAPER, "num_blocks": 12, "hidden_size": 1024}, _PAPER_TRAINING),
    },
    default_preset="tiny",
    paper_presets=("B_6-Wi_512", "B_12-Wi_512", "B_6-Wi_1024", "B_12-Wi_1024"),
    dataset="shapes",
    dataset_kwargs={"resolution": 16, "num_train": 8000, "num_test": 1000},
    recipe=f"{_MODULE}.recipe.ScalingMLPRecipe",
    converter=f"{_MODULE}.convert_scaling_mlp",
    official_code="https://github.com/gregorbachmann/scaling_mlps",
    license="Apache-2.0",
    weights_license="unspecified by the authors",
    bibtex="""@inproceedings{bachmann2023scaling,
  title     = {Scaling {MLPs}: A Tale of Inductive Bias},
  author    = {Bachmann, Gregor and Anagnostidis, Sotiris and Hofmann, Thomas},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}""",
    time_budget_s=40,
    paper_results={
        "B_12-Wi_1024 (IN21k pre-train, fine-tuned), CIFAR-10 top-1": "94.2 (95.5 with test-time augmentation)",
        "B_12-Wi_1024 (IN21k pre-train, fine-tuned), CIFAR-100 top-1": "80.0 (82.6 with test-time augmentation)",
        "B_12-Wi_1024 (IN21k pre-train, fine-tuned), ImageNet-ReaL top-1": "48.6 (57.9 with test-time augmentation)",
    },
)


# Exports load lazily: the record above must stay importable without torch.
__getattr__ = lazy_exports(__name__, {
    "configuration_scaling_mlp": ("ScalingMLPConfig",),
    "modeling_scaling_mlp": ("ScalingMLPModel", "ScalingMLPForImageClassification", "ScalingMLPPreTrainedModel",
                             "BottleneckBlock",),
})
