"""Tiny Stable Diffusion 1.5 / SDXL parts (UNet, CLIP text encoders, tokenizers, scheduler) that run on a CPU in
seconds: what the transparent pipelines are tested and demonstrated with when no real checkpoint can be fetched."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_clip_tokenizer(max_length: int = 16):
    """A character-level `CLIPTokenizer` (lower-case letters and digits) built from a vocabulary written here."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(_CHARACTERS)}
    vocab.update({f"{c}</w>": len(_CHARACTERS) + i for i, c in enumerate(_CHARACTERS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(vocab=str(Path(folder) / "vocab.json"), merges=str(Path(folder) / "merges.txt"),
                             model_max_length=max_length, unk_token="<|endoftext|>")


def _clip_config(tokenizer, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                          projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_sd15_parts(latent_size: int = 8, seed: int = 0) -> dict:
    """unet, text_encoder, tokenizer and scheduler of a tiny SD 1.5 (random weights) for `latent_size` latents."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    return {"unet": unet, "text_encoder": CLIPTextModel(_clip_config(tokenizer)), "tokenizer": tokenizer,
            "scheduler": EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                steps_offset=1)}


def tiny_sdxl_parts(latent_size: int = 8, seed: int = 0) -> dict:
    """unet, both text encoders and tokenizers, and scheduler of a tiny SDXL (random weights)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    time_embed_dim, text_embed_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 2),
        # SDXL's added condition: the pooled text embedding and six size/crop numbers
        projection_class_embeddings_input_dim=text_embed_dim + 6 * time_embed_dim, cross_attention_dim=64,
        norm_num_groups=1)
    return {"unet": unet, "text_encoder": CLIPTextModel(_clip_config(tokenizer)),
            "text_encoder_2": CLIPTextModelWithProjection(_clip_config(tokenizer, text_embed_dim)),
            "tokenizer": tokenizer, "tokenizer_2": tiny_clip_tokenizer(),
            "scheduler": EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                steps_offset=1)}
