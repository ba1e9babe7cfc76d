"""Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised Mask Prediction (Elkerdawy et al.,
CVPR 2022, arXiv 2110.08232)."""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.ftwt"

# job_dynamic.sh: from a trained baseline, 200 epochs of SGD (lr 1e-2, steps x0.1 at epochs 81/122/151, weight
# decay 5e-4, batch 128), predictors at lr 0.1; the mask loss stops half-way (--cooldown 0.5).
_PAPER_TRAINING = {"learning_rate": 1e-2, "weight_decay": 5e-4, "per_device_train_batch_size": 128,
                   "num_epochs": 200}
# From scratch on 16x16 shapes, sized for the zoo: half the epochs dense (the stand-in for the pretrained
# baseline), the mask loss on until 3/4 of the run, a higher rate with one step, no crops (they slow the tiny run
# down more than they help it).
_TINY_TRAINING = {**_PAPER_TRAINING, "learning_rate": 0.2, "per_device_train_batch_size": 64, "num_epochs": 8,
                  "dense_epochs": 4, "cooldown": 0.75, "lr_milestones": (0.75,), "crop_padding": 0}

# CIFAR ResNets of the official code: 3x3 stem, BasicBlocks of widths 16/32/64, parameter-free shortcuts.
_CIFAR_RESNET = {"backbone": "resnet", "stem_type": "cifar", "shortcut_type": "zero-pad", "image_size": 32,
                 "num_labels": 10}
# torchvision's / transformers' ImageNet ResNets (microsoft/resnet-18, -34 load into them).
_IMAGENET_RESNET = {"backbone": "resnet", "stem_type": "imagenet", "shortcut_type": "projection", "image_size": 224,
                    "num_labels": 1000}

RECORD = MethodRecord(
    slug="ftwt",
    kind="model",
    title="Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised Mask Prediction",
    arxiv_id="2110.08232",
    authors="Sara Elkerdawy, Mostafa Elhoushi, Hong Zhang, Nilanjan Ray",
    year=2022,
    task="image-classification",
    config_class=f"{_MODULE}.configuration_ftwt.FTWTConfig",
    model_classes={
        "AutoModel": f"{_MODULE}.modeling_ftwt.FTWTModel",
        "AutoModelForImageClassification": f"{_MODULE}.modeling_ftwt.FTWTForImageClassification",
    },
    processor=f"{_MODULE}.recipe.build_image_processor",
    presets={
        "tiny": Preset({**_CIFAR_RESNET, "image_size": 16, "mass_threshold": 0.95,
                        "resnet_config": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                          "layer_type": "basic", "downsample_in_first_stage": False}},
                       _TINY_TRAINING),
        "tiny-vgg": Preset({"backbone": "vgg", "vgg_stages": [[8], [16, 16]], "image_size": 16,
                            "mass_threshold": 0.95}, _TINY_TRAINING),
        # README of the official code: the decoupled rows of its CIFAR-10 table
        "resnet56-cifar10": Preset({**_CIFAR_RESNET, "mass_threshold": 0.8,
                                    "resnet_config": {"embedding_size": 16, "hidden_sizes": [16, 32, 64],
                                                      "depths": [9, 9, 9], "layer_type": "basic",
                                                      "downsample_in_first_stage": False}}, _PAPER_TRAINING),
        "vgg16-bn-cifar10": Preset({"backbone": "vgg", "image_size": 32, "num_labels": 10, "mass_threshold": 0.92,
                                    "vgg_stages": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512],
                                                   [512, 512, 512]]}, _PAPER_TRAINING),
        "resnet18-imagenet": Preset({**_IMAGENET_RESNET, "mass_threshold": 0.91,
                                     "resnet_config": {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512],
                                                       "depths": [2, 2, 2, 2], "layer_type": "basic",
                                                       "downsample_in_first_stage": False}}, _PAPER_TRAINING),
        "resnet34-imagenet": Preset({**_IMAGENET_RESNET, "mass_threshold": 0.95,
                                     "resnet_config": {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512],
                                                       "depths": [3, 4, 6, 3], "layer_type": "basic",
                                                       "downsample_in_first_stage": False}}, _PAPER_TRAINING),
    },
    default_preset="tiny",
    paper_presets=("resnet56-cifar10", "vgg16-bn-cifar10", "resnet18-imagenet", "resnet34-imagenet"),
    dataset="shapes",
    dataset_kwargs={"resolution": 16, "num_train": 2000, "num_test": 500},
    recipe=f"{_MODULE}.recipe.FTWTRecipe",
    official_code="https://github.com/selkerdawy/FTWT",
    license="unknown",  # the official repository has no licence file
    weights_license="no weights released",
    bibtex="""@inproceedings{elkerdawy2022fire,
  title     = {Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised Mask Prediction},
  author    = {Elkerdawy, Sara and Elhoushi, Mostafa and Zhang, Hong and Ray, Nilanjan},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}""",
    time_budget_s=15,
    paper_results={
        "ResNet-56, CIFAR-10, decoupled, r=0.80: top-1 / FLOPs reduction": "92.63 / 66% (baseline 93.66)",
        "VGG-16-BN, CIFAR-10, decoupled, r=0.92: top-1 / FLOPs reduction": "93.73 / 56% (baseline 93.82)",
        "ResNet-18, ImageNet, decoupled, r=0.91: top-1 / FLOPs reduction": "67.49 / 51.56% (baseline 69.76)",
        "ResNet-34, ImageNet, decoupled, r=0.95: top-1 / FLOPs reduction": "72.79 / 37.77% (baseline 73.30)",
    },
)

# Exports load lazily: the record above must stay importable without torch.
__getattr__ = lazy_exports(__name__, {
    "configuration_ftwt": ("FTWTConfig",),
    "modeling_ftwt": ("FTWTPreTrainedModel", "FTWTModel", "FTWTForImageClassification", "MaskPredictor",
                      "ground_truth_mask", "uniform_ground_truth_mask", "mask_loss"),
})
