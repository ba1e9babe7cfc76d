"""Transparent Image Layer Diffusion using Latent Transparency (LayerDiffuse; Zhang & Agrawala, arXiv 2402.17113)."""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.layerdiffusion"

# The Stable Diffusion VAEs the released weights were trained against (their config.json files).
_SD_VAE = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
           "norm_num_groups": 32}
_SD15_VAE = {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215}
_SDXL_VAE = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# The released encoder (1,181,764 parameters) and decoder (104.1M): the classes' defaults.
_RELEASED = {"transparent_encoder": {}, "transparent_decoder": {}}
# A 1/8-downsampling VAE, encoder and decoder small enough to train on 32x32 layers on 2 CPU cores.
_TINY = {
    "vae": {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 1.0},
    "transparent_encoder": {"block_out_channels": [16, 16, 32, 32]},
    "transparent_decoder": {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1,
                            "down_block_types": ["DownBlock2D"] * 3 + ["AttnDownBlock2D"],
                            "up_block_types": ["AttnUpBlock2D"] + ["UpBlock2D"] * 3},
}

# [recall] the official training code was never released: CPU-sized arguments for every preset.
_TRAINING = {"num_epochs": 7, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32,
             "learning_rate": 6e-3, "lr_scheduler": "cosine", "warmup_steps": 20, "max_grad_norm": 1.0}
# The diffusion model fine-tuned on the transparent latents (`finetune.py`), after the transparent VAE (`vae_stage`).
# tiny: a text-conditioned UNet on the 4x4 latents of 32 px layers, with a 2-layer CLIP text encoder on characters.
# Its transparent-VAE stage runs longer at a lower rate than _TRAINING: on the small VAE trained with a KL weight of
# 1e-4 (recipe.py), 7 epochs at 6e-3 reached 0.53 alpha IoU, 10 epochs of 32 at 2e-3 0.61.
_TINY_FINETUNING = {
    "vae_stage": {**_TRAINING, "num_epochs": 10, "per_device_train_batch_size": 32, "learning_rate": 2e-3}, "num_epochs": 16, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 128,
    "learning_rate": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 20, "max_grad_norm": 1.0,
    "unet": {"sample_size": 4, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D"] * 2,
             "up_block_types": ["CrossAttnUpBlock2D"] * 2, "cross_attention_dim": 32, "attention_head_dim": 8,
             "norm_num_groups": 32},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 64},
}
# sd15: Stable Diffusion 1.5 with a rank-256 LoRA on every attention projection (the released attention weights'
# rank); lr as diffusers' LoRA examples [not the paper's: its fine-tuning arguments were never published].
_SD15_FINETUNING = {"vae_stage": _TRAINING, "base_pipeline": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    "lora_rank": 256, "num_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-4,
                    "lr_scheduler": "constant", "max_grad_norm": 1.0}

RECORD = MethodRecord(
    slug="layerdiffusion",
    title="Transparent Image Layer Diffusion using Latent Transparency",
    arxiv_id="2402.17113",
    authors="Lvmin Zhang, Maneesh Agrawala",
    year=2024,
    task="text-to-image",
    kind="diffusers",
    config_class=None,
    model_classes={"TransparentVAE": f"{_MODULE}.modeling_layerdiffusion.TransparentVAE"},
    presets={"tiny": Preset(_TINY, _TINY_FINETUNING), "sd15": Preset({"vae": _SD15_VAE, **_RELEASED}, _SD15_FINETUNING),
             "sdxl": Preset({"vae": _SDXL_VAE, **_RELEASED}, {**_TRAINING, "finetune_unet": False})},
    default_preset="tiny",
    paper_presets=("sdxl", "sd15"),
    dataset="rgba_layers",
    dataset_kwargs={"resolution": 32, "num_train": 1024, "num_test": 128},
    recipe=f"{_MODULE}.finetune.LayerDiffusionFinetuneRecipe",
    pipeline_class=f"{_MODULE}.pipeline_layerdiffusion.TransparentStableDiffusionPipeline",
    converter=f"{_MODULE}.convert_layerdiffusion",
    official_code="https://github.com/lllyasviel/LayerDiffuse_DiffusersCLI",
    license="Apache-2.0",  # the official diffusers CLI and the Forge extension
    # [not verified here: the Hub cannot be reached] the weights are fine-tunes of SDXL and SD 1.5
    weights_license="as stated on the Hub repos LayerDiffusion/layerdiffusion-v1 and lllyasviel/LayerDiffuse_Diffusers; "
                    "they derive from SDXL (CreativeML Open RAIL++-M) and SD 1.5 (CreativeML Open RAIL-M)",
    bibtex="""@article{zhang2024transparent,
  title   = {Transparent Image Layer Diffusion using Latent Transparency},
  author  = {Zhang, Lvmin and Agrawala, Maneesh},
  journal = {ACM Transactions on Graphics},
  volume  = {43},
  number  = {4},
  year    = {2024}
}""",
    time_budget_s=240,
    paper_results={
        "user preference for native transparent generation over generate-then-matting": "97%",
        "training data": "1M transparent image layer pairs (human-in-the-loop collection)",
    },
)

# Exports load lazily: the record above must stay importable without torch.
__getattr__ = lazy_exports(__name__, {
    "modeling_layerdiffusion": ("LatentTransparencyEncoder", "LatentTransparencyEncoderOutput", "TransparentVAEDecoder",
                                "TransparentVAEDecoderOutput", "TransparentVAE", "TransparentVAEOutput", "pad_rgb",
                                "checkerboard_preview", "rgba_to_tensor", "dihedral", "AUGMENTATIONS",),
    "pipeline_layerdiffusion": ("TransparentPipelineOutput", "TransparentStableDiffusionPipeline",
                                "TransparentStableDiffusionImg2ImgPipeline", "TransparentStableDiffusionXLPipeline",
                                "TransparentStableDiffusionXLImg2ImgPipeline", "TransparentVAEPipeline",),
    "convert_layerdiffusion": ("FORMATS", "ldm_to_diffusers_unet_key", "convert_attn_lora", "apply_attn_lora",
                               "convert_weight_diffs", "merge_weight_diffs", "merge_diffusers_offsets",
                               "load_transparent_encoder", "load_transparent_decoder", "encoder_source_from_filename",
                               "detect_format", "load_safetensors", "convert",),
    "finetune": ("LayerDiffusionFinetuneRecipe", "TransparentLatentDiffusion", "load_transparent_lora",
                 "fitted_shape_iou",),
    "pipeline_layerdiffusion_sd15": ("LayerPipelineOutput", "StableDiffusionLayersPipeline", "MODES",),
    "attention_sharing": ("FrameLoRA", "AttentionSharingProcessor", "AdditionalAttentionCondsEncoder",
                          "AttentionSharingAdapter", "attention_sharing_module_names", "load_attention_sharing",
                          "diffusers_cond_mark",),
})
