"""GS-LoRA and GS-LoRA++: continual forgetting for pre-trained vision models
(Zhao et al., "Continual Forgetting for Pre-trained Vision Models", CVPR 2024, arXiv 2403.11530;
"Practical Continual Forgetting for Pre-trained Vision Models", T-PAMI, arXiv 2501.09705).

A procedure on any transformers image classifier (`hfpapers run gs-lora --model ...`):
`ContinualForgetter(model, GSLoRAConfig(...)).forget(classes, forget_data, retain_data)` puts one peft LoRA
adapter on the FFN Linear layers of every block per task, trains it with the paper's losses through the shared
engine and merges it into the weights.
"""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.gs_lora"

# What the official continual-forgetting script sets for every task (scripts/run_cl_forget.sh): rank 8, lr 1e-2,
# alpha 1e-4, BND 105, 100 epochs, the weight average (0.9) from epoch 30; GSLoRAConfig's defaults hold the rest.
_OFFICIAL = {"rank": 8, "learning_rate": 1e-2, "alpha": 1e-4, "bound": 105.0, "num_epochs": 100, "ema_decay": 0.9,
             "ema_start_epoch": 30}

RECORD = MethodRecord(
    slug="gs-lora",
    kind="procedure",
    title="Continual Forgetting for Pre-trained Vision Models (GS-LoRA, GS-LoRA++)",
    arxiv_id="2403.11530",
    extra_arxiv_ids=("2501.09705",),
    authors="Hongbo Zhao, Bolin Ni, Haochen Wang, Junsong Fan, Fei Zhu, Yuxi Wang, Yuntao Chen, Gaofeng Meng, "
            "Zhaoxiang Zhang",
    year=2024,
    task="image-classification",  # what the forgetting result serves
    config_class=f"{_MODULE}.config.GSLoRAConfig",
    model_classes={},
    runner=f"{_MODULE}.runner.GSLoRARunner",
    presets={
        "tiny": Preset({"rank": 8, "alpha": 0.1, "alpha_warmup_epochs": 5, "beta": 0.15, "bound": 8.0,
                        "few_shot": 16, "num_epochs": 25, "batch_size": 16},
                       {"tasks": (("circle", "square"),)},
                       "tuned here: two classes forgotten from the zoo's Scaling MLP with 16-shot forget and replay "
                       "data (evaluation/reproduce/gs_lora.py's settings, fewer epochs)"),
        "face-casia100": Preset({**_OFFICIAL, "beta": (0.2, 0.25, 0.25, 0.2)}, {},
                                "the official run_cl_forget.sh (GS-LoRA, 4 tasks, replay data): per-task beta"),
        "face-casia100-few-shot": Preset(
            {**_OFFICIAL, "beta": (0.3, 0.4, 0.28, 0.2), "prototypes": True,
             "prototype_forget_weight": (0.015, 0.06, 0.025, 0.012), "prototype_bound": 18.0, "few_shot": 4,
             "batch_size": 4}, {},
            "the official run_cl_forget.sh few-shot run (GS-LoRA++, 4 tasks, 4 shots): per-task beta and prototype "
            "weights, prototype bound 18 (its engine's)"),
    },
    default_preset="tiny",
    paper_presets=("face-casia100", "face-casia100-few-shot"),
    base_method="scaling-mlp",
    dataset="shapes",
    dataset_kwargs={"resolution": 16, "num_train": 8000, "num_test": 1000},
    official_code="https://github.com/bjzhb666/GS-LoRA",
    license="MIT",
    weights_license="no weights released",
    bibtex="""@article{zhao2024continual,
  title   = {Continual Forgetting for Pre-trained Vision Models},
  author  = {Zhao, Hongbo and Ni, Bolin and Wang, Haochen and Fan, Junsong and Zhu, Fei and Wang, Yuxi and
             Chen, Yuntao and Meng, Gaofeng and Zhang, Zhaoxiang},
  journal = {arXiv preprint arXiv:2403.11530},
  year    = {2024}
}

@article{zhao2025practical,
  title   = {Practical Continual Forgetting for Pre-trained Vision Models},
  author  = {Zhao, Hongbo and Zhu, Fei and Ni, Bolin and Zhu, Feng and Meng, Gaofeng and Zhang, Zhaoxiang},
  journal = {arXiv preprint arXiv:2501.09705},
  year    = {2025}
}""",
    time_budget_s=20,
    # [paper] arXiv 2501.09705 Tables 3-4 as shipped in the official README: H / Acc_r / Acc_f / Acc_o in %.
    paper_results={
        "GS-LoRA, face CASIA-100, 4 tasks x 20 classes, full replay, task 4 (40-20)": "73.76 / 72.45 / 0.00 / 1.93",
        "GS-LoRA++, same setting, task 4": "75.23 / 75.36 / 0.00 / 0.00",
        "GS-LoRA, same, few-shot replay (4 per class), task 4": "71.32 / 70.62 / 3.07 / 5.49",
        "GS-LoRA++, same, few-shot replay, task 4": "72.10 / 69.91 / 0.68 / 4.03",
        "GS-LoRA, ImageNet100 (ViT-B/16), 4 tasks x 20 classes, task 4": "86.30 / 86.30 / 0.20 / 0.07",
        "GS-LoRA++, ImageNet100, task 4": "87.00 / 87.50 / 0.00 / 0.07",
    },
)

# Exports load lazily: `import hfpapers` discovers method packages and must not import torch.
__getattr__ = lazy_exports(__name__, {
    "config": ("GSLoRAConfig", "GROUP_TYPES",),
    "adapters": ("FFNTargets", "find_ffn_targets", "lora_groups", "block_norms", "lora_config", "stack_adapters",),
    "losses": ("group_sparse_penalty", "bounded_forgetting_loss", "prototype_kl", "prototype_loss", "alpha_at",
               "class_prototypes",),
    "metrics": ("forgetting_metrics", "h_mean",),
    "forgetter": ("ContinualForgetter", "ForgettingReport", "task_data",),
})
