"""CroCo: Self-Supervised Pre-training for 3D Vision Tasks by Cross-View Completion (Weinzaepfel et al., NeurIPS 2022,
arXiv 2210.10716) and CroCo v2: Improved Cross-view Completion Pre-training for Stereo Matching and Optical Flow
(ICCV 2023, arXiv 2211.10408)."""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.croco"

# The official `CroCoNet` defaults (CroCo.pth): ViT-B/16 encoder at 224 px, 512-d 8-block decoder, sin-cos positions.
_V1 = {"image_size": 224, "patch_size": 16, "mask_ratio": 0.9, "hidden_size": 768, "num_hidden_layers": 12,
       "num_attention_heads": 12, "decoder_hidden_size": 512, "decoder_num_hidden_layers": 8,
       "decoder_num_attention_heads": 16, "position_embedding": "cosine"}
_V2_SMALL = {**_V1, "position_embedding": "rope", "rope_base": 100.0}
_BASE_DECODER = {"decoder_hidden_size": 768, "decoder_num_hidden_layers": 12, "decoder_num_attention_heads": 12}

# pretrain.py: AdamW (betas 0.9, 0.95), weight decay 0.05, lr = 1.5e-4 * batch / 256, 64 per GPU on 8 GPUs,
# 40 warm-up epochs then cosine to 800, stopped at 400 (v2: 12 / 250, stopped at 125).
_PAPER_TRAINING = {"learning_rate": 1.5e-4 * 512 / 256, "weight_decay": 0.05, "lr_scheduler": "cosine",
                   "per_device_train_batch_size": 64, "num_epochs": 400, "mixed_precision": "fp16"}
_TINY_TRAINING = {"learning_rate": 1e-3, "weight_decay": 0.05, "lr_scheduler": "cosine", "warmup_steps": 20,
                  "per_device_train_batch_size": 32, "num_epochs": 6}

RECORD = MethodRecord(
    slug="croco",
    title="CroCo: Self-Supervised Pre-training for 3D Vision Tasks by Cross-View Completion",
    arxiv_id="2210.10716",
    extra_arxiv_ids=("2211.10408",),
    authors="Philippe Weinzaepfel, Vincent Leroy, Thomas Lucas, Romain Brégier, Yohann Cabon, Vaibhav Arora, "
            "Leonid Antsfeld, Boris Chidlovskii, Gabriela Csurka, Jérôme Revaud",
    year=2022,
    task="cross-view-completion",
    config_class=f"{_MODULE}.configuration_croco.CroCoConfig",
    model_classes={
        "AutoModelForPreTraining": f"{_MODULE}.modeling_croco.CroCoForPretraining",
        "AutoModel": f"{_MODULE}.modeling_croco.CroCoModel",
        "AutoModelForDepthEstimation": f"{_MODULE}.modeling_croco.CroCoForDepthEstimation",
    },
    processor=f"{_MODULE}.recipe.build_image_processor",
    pipeline_class=f"{_MODULE}.pipeline_croco.CrossViewCompletionPipeline",
    presets={
        # 32-px pairs, 4-px patches (64 patches, 57 masked): trains on 2 CPU cores in seconds
        "tiny": Preset({"image_size": 32, "patch_size": 4, "mask_ratio": 0.9, "hidden_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "decoder_hidden_size": 64,
                        "decoder_num_hidden_layers": 2, "decoder_num_attention_heads": 4,
                        "position_embedding": "rope"}, _TINY_TRAINING),
        "croco-v1": Preset(_V1, _PAPER_TRAINING, "CroCo.pth (120.1M)"),
        "croco-v2-vitb-small": Preset(_V2_SMALL, _PAPER_TRAINING, "CroCo_V2_ViTBase_SmallDecoder.pth (120.1M)"),
        "croco-v2-vitb-base": Preset({**_V2_SMALL, **_BASE_DECODER}, _PAPER_TRAINING,
                                     "CroCo_V2_ViTBase_BaseDecoder.pth (200.3M)"),
        "croco-v2-vitl-base": Preset({**_V2_SMALL, **_BASE_DECODER, "hidden_size": 1024, "num_hidden_layers": 24,
                                      "num_attention_heads": 16}, _PAPER_TRAINING,
                                     "CroCo_V2_ViTLarge_BaseDecoder.pth (417.9M)"),
    },
    default_preset="tiny",
    paper_presets=("croco-v1", "croco-v2-vitb-small", "croco-v2-vitb-base", "croco-v2-vitl-base"),
    dataset="view_pairs",
    dataset_kwargs={"resolution": 32, "num_train": 512, "num_test": 64},
    recipe=f"{_MODULE}.recipe.CroCoRecipe",
    converter=f"{_MODULE}.convert_croco",
    official_code="https://github.com/naver/croco",
    license="CC-BY-NC-SA-4.0",
    weights_license="CC BY-NC-SA 4.0 (non-commercial use only)",
    bibtex="""@inproceedings{weinzaepfel2022croco,
  title     = {{CroCo}: Self-Supervised Pre-training for {3D} Vision Tasks by Cross-View Completion},
  author    = {Weinzaepfel, Philippe and Leroy, Vincent and Lucas, Thomas and Br{\\'e}gier, Romain and Cabon, Yohann
               and Arora, Vaibhav and Antsfeld, Leonid and Chidlovskii, Boris and Csurka, Gabriela and
               Revaud, J{\\'e}r{\\^o}me},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022}
}
@inproceedings{weinzaepfel2023croco,
  title     = {{CroCo v2}: Improved Cross-view Completion Pre-training for Stereo Matching and Optical Flow},
  author    = {Weinzaepfel, Philippe and Lucas, Thomas and Leroy, Vincent and Cabon, Yohann and Arora, Vaibhav and
               Br{\\'e}gier, Romain and Csurka, Gabriela and Antsfeld, Leonid and Chidlovskii, Boris and
               Revaud, J{\\'e}r{\\^o}me},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}""",
    time_budget_s=30,
    paper_results={
        "claim (CroCo, Sec. 4)": "cross-view completion pre-training transfers better to 3D tasks (depth, flow, pose) "
                                 "than single-view masked image modeling (MAE)",
        "claim (CroCo v2)": "state-of-the-art stereo and flow with a generic ViT (no cost volume, no iterative "
                            "refinement), from real-image pairs, RoPE positions and larger models",
    },
)


# Exports load lazily: the record above must stay importable without torch.
__getattr__ = lazy_exports(__name__, {
    "configuration_croco": ("CroCoConfig",),
    "modeling_croco": ("CroCoModel", "CroCoForPretraining", "CroCoForDepthEstimation", "CroCoPreTrainedModel",
                       "CroCoModelOutput", "CroCoForPretrainingOutput", "RotaryEmbedding2D", "grid_positions",
                       "normalized_patch_mse", "patch_errors", "patchify", "random_mask", "sincos_position_embedding",
                       "standardize_depth", "unpatchify"),
    "pipeline_croco": ("CrossViewCompletionPipeline", "save_completion"),
    "experiments": ("SingleViewRecipe", "depth_arms", "loss_by_displacement", "pretrain_arms"),
})
