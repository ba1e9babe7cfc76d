"""Conversion of released READ checkpoints (rui-qian/READ; LISA layout) to READForReasoningSegmentation.

The official state dict is written here by hand from the official module layout (LLaVA-Llama, the
`segment_anything` modules, `text_hidden_fcs`) with tiny shapes, so the key tests need neither the official code nor
our model class: the target is a holder with the same three children (`llava`, `sam`, `text_hidden_fcs`). The folder
tests build a tiny release as merge_lora_weights_and_save_hf_model.py writes it (Llama-style config.json, tokenizer
with [SEG], <im_start>, <im_end> at the end, safetensors shards) and a CLIPVisionModel folder, convert them, and load
the result with the Auto classes.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SamConfig,
                          SamModel)

from hfpapers.cli import main as hfpapers_main
from hfpapers.methods.read.convert_read import (convert_read_state_dict, load_converted, load_safetensors_dir, main,
                                                remap_vocabulary)

VOCAB, HIDDEN, INTER, LAYERS, HEADS = 100, 32, 64, 2, 4  # the Llama LM
CLIP, CLIP_INTER, CLIP_LAYERS, CLIP_IMAGE, CLIP_PATCH = 24, 48, 2, 28, 14
ENC, ENC_DEPTH, IMAGE, PATCH, WINDOW = 24, 2, 64, 8, 4  # SAM's ViT: block 0 windowed, block 1 global
PROMPT, DEC_MLP, OUT_DIM = 16, 32, 16
GRID = IMAGE // PATCH


def official_read_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under a merged READ checkpoint's names (READForCausalLM.state_dict() without the CLIP tower)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(name, *shape):
        sd[name] = torch.randn(*shape, generator=g)

    def linear(name, n_out, n_in, bias=True):
        put(f"{name}.weight", n_out, n_in)
        if bias:
            put(f"{name}.bias", n_out)

    def norm(name, n):
        put(f"{name}.weight", n)
        put(f"{name}.bias", n)

    # LLaVA-Llama
    put("model.embed_tokens.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for proj in "qkvo":
            linear(f"{p}.self_attn.{proj}_proj", HIDDEN, HIDDEN, bias=False)
        linear(f"{p}.mlp.gate_proj", INTER, HIDDEN, bias=False)
        linear(f"{p}.mlp.up_proj", INTER, HIDDEN, bias=False)
        linear(f"{p}.mlp.down_proj", HIDDEN, INTER, bias=False)
        put(f"{p}.input_layernorm.weight", HIDDEN)
        put(f"{p}.post_attention_layernorm.weight", HIDDEN)
        put(f"{p}.self_attn.rotary_emb.inv_freq", HIDDEN // HEADS // 2)  # a buffer that old saves carry
    put("model.norm.weight", HIDDEN)
    put("lm_head.weight", VOCAB, HIDDEN)
    linear("model.mm_projector.0", HIDDEN, CLIP)
    linear("model.mm_projector.2", HIDDEN, HIDDEN)
    linear("model.text_hidden_fcs.0.0", HIDDEN, HIDDEN)
    linear("model.text_hidden_fcs.0.2", OUT_DIM, HIDDEN)

    # SAM image encoder
    s = "model.visual_model."
    put(f"{s}image_encoder.pos_embed", 1, GRID, GRID, ENC)
    put(f"{s}image_encoder.patch_embed.proj.weight", ENC, 3, PATCH, PATCH)
    put(f"{s}image_encoder.patch_embed.proj.bias", ENC)
    for i in range(ENC_DEPTH):
        b = f"{s}image_encoder.blocks.{i}"
        norm(f"{b}.norm1", ENC)
        linear(f"{b}.attn.qkv", 3 * ENC, ENC)
        linear(f"{b}.attn.proj", ENC, ENC)
        side = WINDOW if i == 0 else GRID
        put(f"{b}.attn.rel_pos_h", 2 * side - 1, ENC // 2)
        put(f"{b}.attn.rel_pos_w", 2 * side - 1, ENC // 2)
        norm(f"{b}.norm2", ENC)
        linear(f"{b}.mlp.lin1", 4 * ENC, ENC)
        linear(f"{b}.mlp.lin2", ENC, 4 * ENC)
    put(f"{s}image_encoder.neck.0.weight", PROMPT, ENC, 1, 1)
    norm(f"{s}image_encoder.neck.1", PROMPT)
    put(f"{s}image_encoder.neck.2.weight", PROMPT, PROMPT, 3, 3)
    norm(f"{s}image_encoder.neck.3", PROMPT)
    # prompt encoder
    put(f"{s}prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", 2, PROMPT // 2)
    for i in range(4):
        put(f"{s}prompt_encoder.point_embeddings.{i}.weight", 1, PROMPT)
    put(f"{s}prompt_encoder.not_a_point_embed.weight", 1, PROMPT)
    put(f"{s}prompt_encoder.mask_downscaling.0.weight", 4, 1, 2, 2)
    put(f"{s}prompt_encoder.mask_downscaling.0.bias", 4)
    norm(f"{s}prompt_encoder.mask_downscaling.1", 4)
    put(f"{s}prompt_encoder.mask_downscaling.3.weight", 16, 4, 2, 2)
    put(f"{s}prompt_encoder.mask_downscaling.3.bias", 16)
    norm(f"{s}prompt_encoder.mask_downscaling.4", 16)
    put(f"{s}prompt_encoder.mask_downscaling.6.weight", PROMPT, 16, 1, 1)
    put(f"{s}prompt_encoder.mask_downscaling.6.bias", PROMPT)
    put(f"{s}prompt_encoder.no_mask_embed.weight", 1, PROMPT)
    # mask decoder
    d = f"{s}mask_decoder."

    def attention(name, internal):
        for proj in "qkv":
            linear(f"{name}.{proj}_proj", internal, PROMPT)
        linear(f"{name}.out_proj", PROMPT, internal)

    for i in range(2):
        layer = f"{d}transformer.layers.{i}"
        attention(f"{layer}.self_attn", PROMPT)
        attention(f"{layer}.cross_attn_token_to_image", PROMPT // 2)
        attention(f"{layer}.cross_attn_image_to_token", PROMPT // 2)
        for j in range(1, 5):
            norm(f"{layer}.norm{j}", PROMPT)
        linear(f"{layer}.mlp.lin1", DEC_MLP, PROMPT)
        linear(f"{layer}.mlp.lin2", PROMPT, DEC_MLP)
    attention(f"{d}transformer.final_attn_token_to_image", PROMPT // 2)
    norm(f"{d}transformer.norm_final_attn", PROMPT)
    put(f"{d}iou_token.weight", 1, PROMPT)
    put(f"{d}mask_tokens.weight", 4, PROMPT)
    put(f"{d}output_upscaling.0.weight", PROMPT, PROMPT // 4, 2, 2)  # ConvTranspose2d: (in, out, k, k)
    put(f"{d}output_upscaling.0.bias", PROMPT // 4)
    norm(f"{d}output_upscaling.1", PROMPT // 4)
    put(f"{d}output_upscaling.3.weight", PROMPT // 4, PROMPT // 8, 2, 2)
    put(f"{d}output_upscaling.3.bias", PROMPT // 8)
    for k in range(4):
        linear(f"{d}output_hypernetworks_mlps.{k}.layers.0", PROMPT, PROMPT)
        linear(f"{d}output_hypernetworks_mlps.{k}.layers.1", PROMPT, PROMPT)
        linear(f"{d}output_hypernetworks_mlps.{k}.layers.2", PROMPT // 8, PROMPT)
    linear(f"{d}iou_prediction_head.layers.0", 16, PROMPT)
    linear(f"{d}iou_prediction_head.layers.1", 16, 16)
    linear(f"{d}iou_prediction_head.layers.2", 4, 16)
    return sd


def official_clip_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """A CLIPModel checkpoint as openai/clip-vit-large-patch14-336 ships it (vision_model.*, plus text parts)."""
    g = torch.Generator().manual_seed(seed)
    v = "vision_model."
    sd = {f"{v}embeddings.class_embedding": torch.randn(CLIP, generator=g),
          f"{v}embeddings.patch_embedding.weight": torch.randn(CLIP, 3, CLIP_PATCH, CLIP_PATCH, generator=g),
          f"{v}embeddings.position_embedding.weight": torch.randn((CLIP_IMAGE // CLIP_PATCH) ** 2 + 1, CLIP,
                                                                  generator=g),
          f"{v}embeddings.position_ids": torch.arange(5)[None]}
    for name in ("pre_layrnorm", "post_layernorm"):
        sd[f"{v}{name}.weight"], sd[f"{v}{name}.bias"] = torch.randn(2, CLIP, generator=g)
    for i in range(CLIP_LAYERS):
        p = f"{v}encoder.layers.{i}"
        for proj in ("q", "k", "v", "out"):
            sd[f"{p}.self_attn.{proj}_proj.weight"] = torch.randn(CLIP, CLIP, generator=g)
            sd[f"{p}.self_attn.{proj}_proj.bias"] = torch.randn(CLIP, generator=g)
        for name in ("layer_norm1", "layer_norm2"):
            sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"] = torch.randn(2, CLIP, generator=g)
        sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"] = torch.randn(CLIP_INTER, CLIP, generator=g), torch.randn(
            CLIP_INTER, generator=g)
        sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"] = torch.randn(CLIP, CLIP_INTER, generator=g), torch.randn(
            CLIP, generator=g)
    sd["text_model.embeddings.token_embedding.weight"] = torch.randn(10, CLIP, generator=g)
    sd["text_projection.weight"] = torch.randn(8, CLIP, generator=g)
    sd["visual_projection.weight"] = torch.randn(8, CLIP, generator=g)
    sd["logit_scale"] = torch.tensor(2.0)
    return sd


def tiny_sam_config() -> SamConfig:
    """SAM with the shapes of `official_read_state_dict` (mask decoder LayerNorm eps 1e-5, as the official SAM)."""
    return SamConfig(
        vision_config=dict(hidden_size=ENC, num_hidden_layers=ENC_DEPTH, num_attention_heads=2, image_size=IMAGE,
                           patch_size=PATCH, window_size=WINDOW, global_attn_indexes=[1], output_channels=PROMPT,
                           num_pos_feats=PROMPT // 2),
        prompt_encoder_config=dict(hidden_size=PROMPT, image_size=IMAGE, patch_size=PATCH, mask_input_channels=16),
        mask_decoder_config=dict(hidden_size=PROMPT, mlp_dim=DEC_MLP, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16, layer_norm_eps=1e-5))


class Holder(nn.Module):
    """The three children of READForReasoningSegmentation, tiny."""

    def __init__(self, vocab_size: int = VOCAB):
        super().__init__()
        self.llava = LlavaForConditionalGeneration(LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=CLIP, intermediate_size=CLIP_INTER,
                                           num_hidden_layers=CLIP_LAYERS, num_attention_heads=2,
                                           image_size=CLIP_IMAGE, patch_size=CLIP_PATCH),
            text_config=LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=vocab_size),
            image_token_index=vocab_size - 1, vision_feature_layer=-2, vision_feature_select_strategy="default",
            projector_hidden_act="gelu", tie_word_embeddings=False))
        self.sam = SamModel(tiny_sam_config())
        self.text_hidden_fcs = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT_DIM),
                                             nn.Dropout(0.0))


@pytest.fixture(scope="module")
def official():
    return official_read_state_dict(), official_clip_state_dict()


def test_release_loads_strictly_and_lands_in_place(official):
    sd, clip = official
    model = Holder()
    assert load_converted(model, sd, vision_tower_state_dict=clip) == []
    s = "model.visual_model."
    lm, sam = model.llava.model.language_model, model.sam
    mlps = sam.mask_decoder.output_hypernetworks_mlps
    pairs = {
        "model.layers.1.self_attn.q_proj.weight": lm.layers[1].self_attn.q_proj.weight,
        "model.layers.0.mlp.down_proj.weight": lm.layers[0].mlp.down_proj.weight,
        "lm_head.weight": model.llava.lm_head.weight,
        "model.mm_projector.0.weight": model.llava.model.multi_modal_projector.linear_1.weight,
        "model.mm_projector.2.bias": model.llava.model.multi_modal_projector.linear_2.bias,
        "model.text_hidden_fcs.0.2.weight": model.text_hidden_fcs[2].weight,
        f"{s}image_encoder.blocks.1.attn.qkv.weight": sam.vision_encoder.layers[1].attn.qkv.weight,
        f"{s}image_encoder.blocks.1.attn.rel_pos_h": sam.vision_encoder.layers[1].attn.rel_pos_h,
        f"{s}image_encoder.blocks.0.norm2.bias": sam.vision_encoder.layers[0].layer_norm2.bias,
        f"{s}image_encoder.patch_embed.proj.weight": sam.vision_encoder.patch_embed.projection.weight,
        f"{s}image_encoder.neck.2.weight": sam.vision_encoder.neck.conv2.weight,
        f"{s}image_encoder.neck.3.bias": sam.vision_encoder.neck.layer_norm2.bias,
        f"{s}prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            sam.shared_image_embedding.positional_embedding,
        f"{s}prompt_encoder.point_embeddings.1.weight": sam.prompt_encoder.point_embed[1].weight,
        f"{s}prompt_encoder.mask_downscaling.4.weight": sam.prompt_encoder.mask_embed.layer_norm2.weight,
        f"{s}prompt_encoder.mask_downscaling.6.weight": sam.prompt_encoder.mask_embed.conv3.weight,
        f"{s}mask_decoder.transformer.layers.1.norm3.weight": sam.mask_decoder.transformer.layers[1].layer_norm3.weight,
        f"{s}mask_decoder.transformer.layers.0.cross_attn_image_to_token.out_proj.weight":
            sam.mask_decoder.transformer.layers[0].cross_attn_image_to_token.out_proj.weight,
        f"{s}mask_decoder.transformer.norm_final_attn.bias": sam.mask_decoder.transformer.layer_norm_final_attn.bias,
        f"{s}mask_decoder.output_upscaling.1.weight": sam.mask_decoder.upscale_layer_norm.weight,
        f"{s}mask_decoder.output_upscaling.3.weight": sam.mask_decoder.upscale_conv2.weight,
        f"{s}mask_decoder.output_hypernetworks_mlps.2.layers.0.weight": mlps[2].proj_in.weight,
        f"{s}mask_decoder.output_hypernetworks_mlps.2.layers.1.bias": mlps[2].layers[0].bias,
        f"{s}mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": mlps[3].proj_out.weight,
        f"{s}mask_decoder.iou_prediction_head.layers.2.bias": sam.mask_decoder.iou_prediction_head.proj_out.bias,
    }
    for key, param in pairs.items():
        assert torch.equal(param, sd[key]), key
    # SamModel keeps the Fourier matrix twice; both copies are the official buffer.
    assert torch.equal(sam.prompt_encoder.shared_embedding.positional_embedding,
                       sd[f"{s}prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    tower = model.llava.model.vision_tower
    assert torch.equal(tower.encoder.layers[1].self_attn.out_proj.weight,
                       clip["vision_model.encoder.layers.1.self_attn.out_proj.weight"])
    assert torch.equal(tower.embeddings.class_embedding, clip["vision_model.embeddings.class_embedding"])


def test_converted_keys_are_exactly_the_model_keys(official):
    sd, clip = official
    converted = convert_read_state_dict(sd, vision_tower_state_dict=clip)
    assert set(converted) == set(Holder().state_dict())
    # An unfiltered save (tower inside, transformers-4 `vision_model.` level) converts to the same keys.
    inside = {**sd, **{"model.vision_tower.vision_tower." + k: v for k, v in clip.items() if k.startswith("vision_")}}
    assert set(convert_read_state_dict(inside)) == set(converted)


def test_unknown_keys_raise_one_error_naming_them(official):
    sd, _ = official
    bad = {**sd, "model.some_new_head.weight": torch.zeros(1),
           "model.visual_model.mask_decoder.extra_token.weight": torch.zeros(1)}
    with pytest.raises(ValueError) as error:
        convert_read_state_dict(bad)
    message = str(error.value)
    assert "2 of" in message and "model.some_new_head.weight" in message
    assert "model.visual_model.mask_decoder.extra_token.weight" in message and "merge_lora" in message
    with pytest.raises(ValueError, match="unmerged"):
        convert_read_state_dict({**sd, "model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(1)})


def test_missing_and_mismatched_keys_are_reported(official):
    sd, clip = official
    partial = {k: v for k, v in sd.items() if k != "model.visual_model.mask_decoder.iou_token.weight"}
    with pytest.raises(ValueError) as error:
        load_converted(Holder(), partial, vision_tower_state_dict=clip)
    assert "sam.mask_decoder.iou_token.weight" in str(error.value) and "missing keys (1)" in str(error.value)
    # A release alone lacks the CLIP tower: the error says where it comes from.
    with pytest.raises(ValueError, match="openai/clip-vit-large-patch14-336") as error:
        load_converted(Holder(), sd)
    assert "llava.model.vision_tower.embeddings.class_embedding" in str(error.value)
    with pytest.raises(ValueError, match="vocabulary differs"):
        load_converted(Holder(vocab_size=VOCAB + 4), sd, vision_tower_state_dict=clip)


def test_vocabulary_remap_moves_the_seg_row(official):
    sd, clip = official
    converted = convert_read_state_dict(sd, vision_tower_state_dict=clip)
    # e.g. the release's [SEG] (row 97) goes to our last row, its two last rows are dropped
    remapped = remap_vocabulary(converted, VOCAB + 4, {97: VOCAB + 3, 98: None, 99: None})
    for key in ("llava.model.language_model.embed_tokens.weight", "llava.lm_head.weight"):
        old, new = converted[key], remapped[key]
        assert new.shape == (VOCAB + 4, HIDDEN)
        assert torch.equal(new[:97], old[:97]) and torch.equal(new[VOCAB + 3], old[97])
        assert torch.allclose(new[98], old.mean(0))
    with pytest.raises(ValueError, match="same row"):
        remap_vocabulary(converted, VOCAB, {5: 6})


def test_loads_under_peft_adapters(official):
    from peft import LoraConfig, inject_adapter_in_model

    sd, clip = official
    model = Holder()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                       trainable_token_indices={"embed_tokens": [VOCAB - 2]}),
                            model.llava.model.language_model)
    kept = load_converted(model, sd, vision_tower_state_dict=clip)
    assert kept and all("lora_" in key for key in kept)
    lm = model.llava.model.language_model
    assert torch.equal(lm.layers[1].self_attn.q_proj.base_layer.weight, sd["model.layers.1.self_attn.q_proj.weight"])
    embed = sd["model.embed_tokens.weight"]
    assert torch.equal(lm.embed_tokens.token_adapter.trainable_tokens_delta["default"][0], embed[VOCAB - 2])
    assert torch.equal(lm.get_input_embeddings()(torch.tensor([VOCAB - 2, 3])), embed[[VOCAB - 2, 3]])


def test_safetensors_shards_are_read_and_bin_refused(official, tmp_path):
    sd, _ = official
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[len(keys) // 2:]}, tmp_path / "model-00002-of-00002.safetensors")
    read = load_safetensors_dir(tmp_path)
    assert read.keys() == sd.keys() and torch.equal(read[keys[0]], sd[keys[0]])
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "pytorch_model-00001-of-00002.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="convert them to safetensors first"):
        load_safetensors_dir(tmp_path / "bins")


# --- a whole release folder (config.json, tokenizer, safetensors) + a CLIP folder -> a READ folder ----------------

IMAGE_TOKEN, IM_START, IM_END, SEG = "<image>", "<im_start>", "<im_end>", "[SEG]"
# What the official code writes for one image and one question (llava_v1 conversation, mm_use_im_start_end).
OFFICIAL_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions. USER: <im_start><image><im_end>\n"
                   "What is the cat doing? Please output segmentation mask. ASSISTANT:")


def release_tokenizer():
    """A tiny Llama tokenizer (transformers' LlamaTokenizer, byte-fallback BPE, one token per character, legacy
    "▁" before every piece) with the release's added tokens at the end: [SEG], then <im_start>, <im_end>."""
    import string

    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for char in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], legacy=True, add_bos_token=True)
    tokenizer.add_tokens(SEG)  # as init_READ_model: add_tokens("[SEG]"), then the image delimiters as special
    tokenizer.add_tokens([IM_START, IM_END], special_tokens=True)
    return tokenizer


def official_ids(tokenizer, prompt: str) -> list[int]:
    """The official `tokenizer_image_token` (model/llava/mm_utils.py) under transformers 4.31: the prompt split on
    "<image>" (-200 in its place), each chunk tokenized with BOS (dropped after the first), and within a chunk the
    whitespace on both sides of every added token stripped (4.31 `PreTrainedTokenizer.tokenize`), each piece
    encoded alone (sentencepiece's dummy prefix, legacy)."""
    added = [SEG, IM_START, IM_END]
    ids = [tokenizer.bos_token_id]
    for n, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if n:
            ids.append(-200)
        pieces = re.split("(" + "|".join(map(re.escape, added)) + ")", chunk)
        for i, piece in enumerate(pieces):
            if piece in added:
                ids.append(tokenizer.convert_tokens_to_ids(piece))
                continue
            if i + 1 < len(pieces) and pieces[i + 1] in added:
                piece = piece.rstrip()
            if i > 0 and pieces[i - 1] in added:
                piece = piece.lstrip()
            if piece:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny release folder as merge_lora_weights_and_save_hf_model.py writes it, and a CLIPVisionModel folder."""
    import json

    from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

    root = tmp_path_factory.mktemp("release")
    folder, clip_folder = root / "READ-LLaVA-v1.5-7B", root / "clip-vit-large-patch14-336"
    tokenizer = release_tokenizer()
    tokenizer.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "legacy": True, "pad_token": "<unk>"}))
    vocab = len(tokenizer)
    config = {"architectures": ["READForCausalLM"], "model_type": "llava", "vocab_size": vocab,
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "hidden_act": "silu",
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "initializer_range": 0.02, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None,
              "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.31.0",
              "use_cache": False, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": CLIP,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": True, "mm_use_im_patch_token": False, "image_aspect_ratio": "square",
              "freeze_mm_mlp_adapter": True, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
              "out_dim": OUT_DIM, "train_mask_decoder": True}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS, max_position_embeddings=256, rms_norm_eps=1e-5))
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    weights.update({k: v for k, v in official_read_state_dict(seed=3).items()
                    if k.startswith(("model.mm_projector.", "model.text_hidden_fcs.", "model.visual_model."))})
    weights = {k: v.contiguous() for k, v in weights.items()}
    keys = sorted(weights)
    save_file({k: weights[k] for k in keys[::2]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: weights[k] for k in keys[1::2]}, folder / "model-00002-of-00002.safetensors")

    CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP, intermediate_size=CLIP_INTER, num_hidden_layers=CLIP_LAYERS,
                                     num_attention_heads=2, image_size=CLIP_IMAGE, patch_size=CLIP_PATCH)
                    ).save_pretrained(clip_folder)
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE},
                       crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}).save_pretrained(clip_folder)
    clip_weights = load_safetensors_dir(clip_folder)
    return {"folder": folder, "clip": clip_folder, "weights": weights, "clip_weights": clip_weights,
            "vocab": vocab, "root": root}


@pytest.fixture(scope="module")
def converted(release):
    """The release converted through the command line, with a tiny SAM config instead of SAM ViT-H's."""
    out, sam = release["root"] / "converted", release["root"] / "sam"
    tiny_sam_config().save_pretrained(sam)
    assert hfpapers_main(["convert", "read", str(release["folder"]), str(out), "--vision-tower", str(release["clip"]),
                          "--sam-config", str(sam), "--down-sample", "1"]) == 0
    return out


def test_converted_folder_loads_with_the_auto_classes_and_keeps_the_release_ids(release, converted):
    import hfpapers
    from transformers import AutoModel, AutoProcessor

    hfpapers.register_with_transformers()  # what importing hfpapers does once transformers' Auto classes load
    model, processor = AutoModel.from_pretrained(converted), AutoProcessor.from_pretrained(converted)
    assert type(model).__name__ == "READForReasoningSegmentation" and type(processor).__name__ == "READProcessor"
    vocab, tokenizer = release["vocab"], processor.tokenizer
    # The release's ids stay; <image> comes last, at the release's vocab_size.
    assert tokenizer.convert_tokens_to_ids([SEG, IM_START, IM_END, IMAGE_TOKEN]) == [vocab - 3, vocab - 2,
                                                                                     vocab - 1, vocab]
    config = model.config
    assert config.seg_token_index == vocab - 3 and config.llava_config.image_token_index == vocab
    llava = config.llava_config
    assert (llava.text_config.vocab_size, llava.image_seq_length, processor.image_seq_length) == (vocab + 1, 4, 4)
    assert (llava.vision_feature_layer, llava.vision_feature_select_strategy, llava.projector_hidden_act) == (
        -2, "default", "gelu")
    assert llava.text_config.rms_norm_eps == 1e-5 and config.out_dim == OUT_DIM and config.lora_r == 0
    assert (config.use_sasp, config.num_points, config.down_sample, config.t_pos) == (True, 30, 1, 0.8)
    assert config.sam_config.mask_decoder_config.layer_norm_eps == 1e-5
    assert tokenizer.pad_token == "<unk>" and tokenizer.padding_side == "left"


def test_converted_tensors_equal_their_sources(release, converted):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(converted)
    sd, clip, vocab = release["weights"], release["clip_weights"], release["vocab"]
    lm = model.llava.model.language_model
    embed, head = lm.embed_tokens.weight, model.llava.lm_head.weight
    assert embed.shape == head.shape == (vocab + 1, HIDDEN)
    assert torch.equal(embed[:vocab], sd["model.embed_tokens.weight"])
    assert torch.equal(head[:vocab], sd["lm_head.weight"])
    # the <image> row is never read as an embedding; it is the mean row, as LLaVA initialises added tokens
    torch.testing.assert_close(embed[vocab], sd["model.embed_tokens.weight"].mean(0))
    torch.testing.assert_close(head[vocab], sd["lm_head.weight"].mean(0))
    s = "model.visual_model."
    pairs = {
        "model.layers.1.self_attn.v_proj.weight": lm.layers[1].self_attn.v_proj.weight,
        "model.layers.0.post_attention_layernorm.weight": lm.layers[0].post_attention_layernorm.weight,
        "model.norm.weight": lm.norm.weight,
        "model.mm_projector.0.weight": model.llava.model.multi_modal_projector.linear_1.weight,
        "model.mm_projector.2.bias": model.llava.model.multi_modal_projector.linear_2.bias,
        "model.text_hidden_fcs.0.0.weight": model.text_hidden_fcs[0].weight,
        f"{s}image_encoder.blocks.0.attn.rel_pos_w": model.sam.vision_encoder.layers[0].attn.rel_pos_w,
        f"{s}mask_decoder.output_hypernetworks_mlps.0.layers.2.weight":
            model.sam.mask_decoder.output_hypernetworks_mlps[0].proj_out.weight,
        f"{s}prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            model.sam.prompt_encoder.shared_embedding.positional_embedding,
    }
    for key, param in pairs.items():
        assert torch.equal(param, sd[key]), key
    tower = model.llava.model.vision_tower
    clip = {key.removeprefix("vision_model."): tensor for key, tensor in clip.items()}  # transformers 4 / 5 names
    assert torch.equal(tower.encoder.layers[1].mlp.fc1.weight, clip["encoder.layers.1.mlp.fc1.weight"])
    assert torch.equal(tower.embeddings.patch_embedding.weight, clip["embeddings.patch_embedding.weight"])


def test_prompt_and_tokens_are_the_official_ones(release, converted):
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(converted)
    question = "What is the cat doing? Please output segmentation mask."
    assert processor.prompt(question) == OFFICIAL_PROMPT
    # A training conversation (conv.append_message(ASSISTANT, answer): "ASSISTANT: {answer}</s>").
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Sure, [SEG]."}]}]
    assert processor.apply_chat_template(turns, tokenize=False) == OFFICIAL_PROMPT + " Sure, [SEG].</s>"
    # The other system prompt (test_read.py, demo.py) and a release without <im_start>/<im_end>.
    from jinja2 import Template

    from hfpapers.methods.read.convert_read import official_chat_template, official_prompt

    for conversation, start_end in (("vicuna_v1", True), ("llava_v1", False)):
        rendered = Template(official_chat_template(conversation, start_end)).render(messages=turns[:1],
                                                                                 add_generation_prompt=True)
        assert rendered == official_prompt(question, conversation, start_end)
    assert "curious user" in official_prompt("q", "vicuna_v1")
    assert "USER: <image>\nq ASSISTANT:" in official_prompt("q", use_im_start_end=False)
    # A training-style answer with [SEG]: ids as the official 4.31 tokenizer + tokenizer_image_token give them.
    text = processor.prompt(question) + " Sure, the segmentation result is [SEG]."
    ids = processor(text=[text])["input_ids"][0].tolist()
    image = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image) == processor.image_seq_length
    collapsed = [t for i, t in enumerate(ids) if t != image or ids[i - 1] != image]
    release_tokenizer = AutoTokenizer.from_pretrained(release["folder"], legacy=True)
    assert [-200 if t == image else t for t in collapsed] == official_ids(release_tokenizer, text)


def test_converted_model_segments_from_processor_inputs(converted):
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(converted).eval(), AutoProcessor.from_pretrained(converted)
    images = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("L", (30, 30), 90)]
    questions = ["What is the red thing?", "Where is the grey wall?"]
    inputs = processor(images=images, text=[processor.prompt(q) + " [SEG]." for q in questions])
    assert inputs["pixel_values"].shape == (2, 3, CLIP_IMAGE, CLIP_IMAGE)
    assert inputs["sam_pixel_values"].shape == (2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert [tuple(m.shape) for m in out.pred_masks] == [(40, 50), (30, 30)]
    assert all(torch.isfinite(m).all() for m in out.pred_masks) and all(p is not None for p in out.points)


def test_the_function_returns_the_model_the_folder_holds(release, converted):
    from transformers import AutoModel

    from hfpapers.methods.read.convert_read import convert_read_checkpoint

    model = convert_read_checkpoint(release["folder"], release["clip"], sam_config=tiny_sam_config(),
                                    down_sample=1)
    saved = AutoModel.from_pretrained(converted).state_dict()
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[key]) for key, tensor in model.state_dict().items())


def test_bin_only_release_is_refused_with_a_clear_message(release, tmp_path, capsys):
    import shutil

    from hfpapers.methods.read.convert_read import convert_read_checkpoint

    folder = tmp_path / "bins"
    shutil.copytree(release["folder"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"pickled \.bin files are never unpickled"):
        convert_read_checkpoint(folder, release["clip"], sam_config=tiny_sam_config())
    assert main([str(folder), str(tmp_path / "o"), "--vision-tower", str(release["clip"])]) == 1
    assert "pytorch_model-00001-of-00002.bin" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_release_and_vision_tower_mismatches_are_named(release, tmp_path):
    import json
    import shutil

    from hfpapers.methods.read.convert_read import convert_read_checkpoint, read_settings, sam_vit_h_config

    wide = tmp_path / "clip-wide"
    shutil.copytree(release["clip"], wide)
    settings = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**settings, "hidden_size": 2 * CLIP}))
    with pytest.raises(ValueError, match="projector reads 24-d features"):
        convert_read_checkpoint(release["folder"], wide, sam_config=tiny_sam_config())
    with pytest.raises(ValueError, match="LoRA is merged"):
        convert_read_checkpoint(release["folder"], release["clip"], sam_config=tiny_sam_config(), lora_r=8)
    sam = sam_vit_h_config()  # the default SAM: ViT-H, official LayerNorm eps in the two-way transformer
    assert (sam.vision_config.hidden_size, sam.vision_config.num_hidden_layers, sam.vision_config.image_size) == (
        1280, 32, 1024)
    assert sam.vision_config.global_attn_indexes == [7, 15, 23, 31]
    assert sam.mask_decoder_config.layer_norm_eps == 1e-5 and sam.prompt_encoder_config.hidden_size == 256
    assert read_settings({"architectures": ["LISAForCausalLM"], "hidden_size": 4096}) == {"use_sasp": False}
    assert read_settings({"architectures": ["READForCausalLM"], "hidden_size": 5120})["num_points"] == 60


def test_a_sentencepiece_release_tokenizes_as_the_official_code(tmp_path):
    """The layout of a real release (transformers 4.31: tokenizer.model, added_tokens.json, legacy=True), where
    sentencepiece and protobuf are installed: token ids equal the official ones, before and after saving."""
    import json

    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from transformers import AutoTokenizer

    from hfpapers.methods.read.convert_read import load_release_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((OFFICIAL_PROMPT.replace("<im_start><image><im_end>", "") + " Sure, the result is .\n") * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), model_type="bpe", vocab_size=300,
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    vocab = sp.get_piece_size()
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 2048, "pad_token": None,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    (folder / "added_tokens.json").write_text(json.dumps({SEG: vocab, IM_START: vocab + 1, IM_END: vocab + 2}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llava", "vocab_size": vocab + 3}))

    class Official:  # the 4.31 tokenizer as official_ids reads it: sentencepiece per piece, added tokens by id
        bos_token_id = 1

        @staticmethod
        def convert_tokens_to_ids(token):
            return vocab + [SEG, IM_START, IM_END].index(token)

        def __call__(self, piece, add_special_tokens=False):
            return {"input_ids": sp.encode(piece)}

    tokenizer = load_release_tokenizer(folder)
    tokenizer.save_pretrained(tmp_path / "saved")
    for tok in (tokenizer, AutoTokenizer.from_pretrained(tmp_path / "saved")):
        image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        assert image == vocab + 3
        for text in (OFFICIAL_PROMPT + " Sure, the result is [SEG].", OFFICIAL_PROMPT.replace("cat", "cat\n  ")):
            ids = [-200 if t == image else t for t in tok(text)["input_ids"]]
            assert ids == official_ids(Official(), text)
