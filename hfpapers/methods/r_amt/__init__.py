"""Regularized Mask Tuning: Uncovering Hidden Knowledge in Pre-trained Vision-Language Models (arXiv 2307.15049)."""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.r_amt"

# A tiny CLIP (32 px, patches of 8, 2 blocks of width 32) for CPU: the recipe pre-trains it on the embedded captioned
# shapes first; `--config base_model=<CLIP Hub id or folder>` masks real weights instead.
_TINY_CLIP = {"projection_dim": 32,
              "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "intermediate_size": 64},
              "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 64, "max_position_embeddings": 16}}
# OpenAI CLIP ViT-B/16 (what `openai/clip-vit-base-patch16` holds), the paper's backbone.
_VIT_B16 = {"projection_dim": 512,
            "vision_config": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "intermediate_size": 3072},
            "text_config": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                            "intermediate_size": 2048, "max_position_embeddings": 77, "vocab_size": 49408}}
# Official `MASK` config: masks on q/k/v/out of every vision block and on the patch embedding, '1s' init at 1e-2.
_ADAPTER = {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "patch_embedding"], "mask_scale": 1e-2,
            "threshold": 5e-3}
# configs/trainers/MASK/vit_b16.yaml: Adam, lr 8e-5, no weight decay, cosine without warm-up, 30 epochs, batch 32
_PAPER_TRAINING = {"learning_rate": 8e-5, "weight_decay": 0.0, "lr_scheduler": "cosine", "warmup_steps": 0,
                   "per_device_train_batch_size": 32, "num_epochs": 30, "mixed_precision": "no", "gdr_lambda": 1.0}
# 16 shots x 10 classes make 5 steps an epoch: a larger step lets masks cross the threshold in 150 steps.
# Colour classes are prompted with an ensemble over the shape words ("a {} circle", "a {} square", ...).
_TINY_TRAINING = {**_PAPER_TRAINING, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
                  "templates": [f"a {{}} {shape}" for shape in ("circle", "square", "triangle", "diamond", "cross",
                                                               "ring", "star", "hexagon", "semicircle", "arrow")]}

RECORD = MethodRecord(
    slug="r-amt",
    kind="adapter",
    title="Regularized Mask Tuning: Uncovering Hidden Knowledge in Pre-trained Vision-Language Models",
    arxiv_id="2307.15049",
    authors="Kecheng Zheng, Wei Wu, Ruili Feng, Kai Zhu, Jiawei Liu, Deli Zhao, Zheng-Jun Zha, Wei Chen, Yujun Shen",
    year=2023,
    task="zero-shot-image-classification",
    config_class=None,  # the adapter's settings are the preset's "adapter" dict (RAmtConfig)
    # The adapted model; it loads with `MaskTunedCLIP.from_pretrained(folder)` (bit-packed masks, not peft's loader).
    model_classes={"AutoModelForZeroShotImageClassification": f"{_MODULE}.adapters.MaskTunedCLIP"},
    presets={
        "tiny": Preset({"base": _TINY_CLIP, "adapter": _ADAPTER}, _TINY_TRAINING,
                       "a 2-block 32-wide CLIP pre-trained here on captioned shapes, 16 shots of each colour"),
        "vit-b16": Preset({"base": _VIT_B16, "adapter": _ADAPTER}, _PAPER_TRAINING,
                          "the paper's CLIP ViT-B/16, 16 shots: --config base_model=openai/clip-vit-base-patch16"),
    },
    default_preset="tiny",
    paper_presets=("vit-b16",),
    # Name the colour of a shape whose colour is shifted from the exact named colours the tiny CLIP is pre-trained
    # on; labels cycle through the 8 colours, so 128 training images are 16 shots of each.
    dataset="captioned_shapes",
    dataset_kwargs={"resolution": 32, "num_train": 128, "num_test": 400, "label": "colour", "colour_jitter": 60},
    recipe=f"{_MODULE}.recipe.RAmtRecipe",
    official_code="https://github.com/wuw2019/R-AMT",
    license="MIT",
    weights_license="no weights released",
    bibtex="""@inproceedings{RMT2023,
  title     = {Regularized Mask Tuning: Uncovering Hidden Knowledge in Pre-trained Vision-Language Models},
  author    = {Zheng, Kecheng and Wu, Wei and Feng, Ruili and Zhu, Kai and Liu, Jiawei and Zhao, Deli and
               Zha, Zheng-Jun and Chen, Wei and Shen, Yujun},
  booktitle = {ICCV},
  year      = {2023}
}""",
    time_budget_s=20,
    paper_results={
        "ViT-B/16, 16 shots, mean of 11 datasets, top-1 %": "zero-shot CLIP 65.23, AMT 83.46, R-AMT 83.96",
        "ViT-B/16, R-AMT 1 / 2 / 4 / 8 shots, mean top-1 %": "70.52 / 73.48 / 77.58 / 80.10",
        "parameters masked out (mean over the 11 datasets)": "2.56 %",
    },
)

# Exports load lazily: the record above must stay importable without torch.
__getattr__ = lazy_exports(__name__, {
    "adapters": ("Binarizer", "MaskTunedCLIP", "MaskedLayer", "RAmtConfig", "zero_shot_classifier"),
    "recipe": ("ClipPretrainingRecipe", "GradientDropout", "MaskedFraction", "RAmtRecipe", "gradient_dropout",
               "kl_to_zero_shot", "pretrain_clip", "tiny_clip_processor"),
})
