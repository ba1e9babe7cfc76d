"""READ: "Reasoning to Attend: Try to Understand How <SEG> Token Works" (Qian et al., CVPR 2025, arXiv 2412.17741)."""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.read"

# LLaVA-1.5 (llava-hf layout: CLIP ViT-L/14-336, 2-layer GELU projector, Vicuna) and SAM ViT-H, as config values.
_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
               "projection_dim": 768, "hidden_act": "quick_gelu"}
_VICUNA_7B = {"model_type": "llama", "vocab_size": 32065, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
_VICUNA_13B = {**_VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
_SAM_VIT_H = {"vision_config": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                                "global_attn_indexes": [7, 15, 23, 31], "output_channels": 256},
              # the official two-way transformer's LayerNorms keep PyTorch's eps 1e-5 (transformers' default: 1e-6)
              "mask_decoder_config": {"layer_norm_eps": 1e-5}}


def _llava(text_config):
    # [SEG] is appended after the llava-hf vocabulary (32,064 tokens incl. <image> and <pad>).
    return {"vision_config": _CLIP_L_336, "text_config": text_config, "image_token_index": 32000,
            "image_seq_length": 576, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "tie_word_embeddings": False}


# A 2-layer, 64-d LLaVA over the scenes' words (64 px, 8x8 image tokens) and a 64-px SAM: trains on 2 CPU cores.
_TINY = {
    "llava_config": {"vision_config": {"model_type": "clip_vision_model", "hidden_size": 48, "intermediate_size": 96,
                                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
                                       "patch_size": 8, "projection_dim": 48},
                     "text_config": {"model_type": "llama", "vocab_size": 72, "hidden_size": 64,
                                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "max_position_embeddings": 256,
                                     "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 2,
                                     "eos_token_id": 3},
                     "image_token_index": 4, "image_seq_length": 64, "projector_hidden_act": "gelu",
                     "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                     "tie_word_embeddings": False},
    "sam_config": {"vision_config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                                     "image_size": 64, "patch_size": 8, "output_channels": 32, "window_size": 4,
                                     "global_attn_indexes": [1], "mlp_dim": 96, "num_pos_feats": 16,
                                     "initializer_range": 0.02},  # transformers: 1e-10, for loading only
                   "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 8,
                                             "mask_input_channels": 4},
                   "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "iou_head_hidden_dim": 32}},
    # The ids of the word tokenizer (recipe.build_word_tokenizer): <pad> 0, <s> 2, </s> 3, <image> 4, [SEG] 5.
    "seg_token_index": 5, "num_points": 16, "down_sample": 2, "lora_r": 0,
}

# The official training arguments (LISA / READ scripts).
_PAPER_TRAINING = {"learning_rate": 3e-4, "weight_decay": 0.0, "lr_scheduler": "linear", "warmup_steps": 100,
                   "per_device_train_batch_size": 2, "gradient_accumulation_steps": 10, "num_epochs": 20,
                   "mixed_precision": "bf16", "max_grad_norm": 1.0}
# CPU-sized training of the tiny presets, from scratch.
_TINY_TRAINING = {**_PAPER_TRAINING, "learning_rate": 2e-3, "warmup_steps": 20, "per_device_train_batch_size": 16,
                  "gradient_accumulation_steps": 1, "num_epochs": 3, "mixed_precision": "no", "train_all": True,
                  "lr_scheduler": "cosine", "sam_pretrain_epochs": 6}

RECORD = MethodRecord(
    slug="read",
    title="Reasoning to Attend: Try to Understand How <SEG> Token Works",
    arxiv_id="2412.17741",
    authors="Rui Qian, Xin Yin, Dejing Dou",
    year=2025,
    task="reasoning-segmentation",
    config_class=f"{_MODULE}.configuration_read.READConfig",
    model_classes={"AutoModel": f"{_MODULE}.modeling_read.READForReasoningSegmentation"},
    processor=f"{_MODULE}.recipe.load_processor",
    processor_class=f"{_MODULE}.processing_read.READProcessor",
    pipeline_class=f"{_MODULE}.pipeline_read.ReasoningSegmentationPipeline",
    presets={
        "tiny": Preset(_TINY, _TINY_TRAINING),
        "tiny-lisa": Preset({**_TINY, "use_sasp": False}, _TINY_TRAINING),
        "read-7b": Preset({"llava_config": _llava(_VICUNA_7B), "sam_config": _SAM_VIT_H, "seg_token_index": 32064,
                           "num_points": 30, "down_sample": 2, "t_pos": 0.8}, _PAPER_TRAINING),
        # The official code's setting for the 13B ReasonSeg test set.
        "read-13b": Preset({"llava_config": _llava(_VICUNA_13B), "sam_config": _SAM_VIT_H, "seg_token_index": 32064,
                            "num_points": 60, "down_sample": 1, "t_pos": 0.6}, _PAPER_TRAINING),
    },
    default_preset="tiny",
    paper_presets=("read-7b", "read-13b"),
    dataset="referring_scenes",
    dataset_kwargs={"num_train": 1024, "num_test": 128},
    recipe=f"{_MODULE}.recipe.READRecipe",
    converter=f"{_MODULE}.convert_read",
    official_code="https://github.com/rui-qian/READ",
    license="Apache-2.0",
    weights_license="Apache-2.0 (READ); LLaVA-1.5 weights follow the Llama 2 licence; SAM is Apache-2.0",
    bibtex="""@inproceedings{qian2025reasoning,
  title     = {Reasoning to Attend: Try to Understand How <SEG> Token Works},
  author    = {Qian, Rui and Yin, Xin and Dou, Dejing},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025}
}""",
    time_budget_s=90,
    paper_results={
        "ReasonSeg val, READ-7B (LLaVA-1.5, ft), gIoU / cIoU": "59.8 / 67.6",
        "ReasonSeg test, READ-7B, gIoU / cIoU": "58.5 / 58.6",
        "ReasonSeg test, READ-13B, gIoU / cIoU": "62.2 / 62.8",
        "ReasonSeg test, LISA-7B-LLaVA1.5 (ft), gIoU / cIoU": "55.6 / 56.9",
        "RefCOCO val / testA / testB cIoU, READ-7B": "78.1 / 80.2 / 73.2",
    },
)


# Exports load lazily: the record above must stay importable without torch.
__getattr__ = lazy_exports(__name__, {
    "configuration_read": ("READConfig",),
    "modeling_read": ("READForReasoningSegmentation", "READOutput", "READPreTrainedModel", "SimilarityAsPoints",
                      "SEG_TOKEN", "dice_loss", "postprocess_masks", "sigmoid_ce_loss", "resize_longest_side",),
    "processing_read": ("READProcessor",),
    "pipeline_read": ("ReasoningSegmentationPipeline", "save_overlay",),
})
