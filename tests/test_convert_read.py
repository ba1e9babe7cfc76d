"""Conversion of released READ checkpoints (rui-qian/READ; LISA layout) to READForReasoningSegmentation's keys.

The official state dict is written here by hand from the official module layout (LLaVA-Llama, the
`segment_anything` modules, `text_hidden_fcs`) with tiny shapes, so the tests need neither the official code nor our
model class: the target is a holder with the same three children (`llava`, `sam`, `text_hidden_fcs`).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SamConfig,
                          SamModel)

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
        self.sam = SamModel(SamConfig(
            vision_config=dict(hidden_size=ENC, num_hidden_layers=ENC_DEPTH, num_attention_heads=2, image_size=IMAGE,
                               patch_size=PATCH, window_size=WINDOW, global_attn_indexes=[1], output_channels=PROMPT,
                               num_pos_feats=PROMPT // 2),
            prompt_encoder_config=dict(hidden_size=PROMPT, image_size=IMAGE, patch_size=PATCH,
                                       mask_input_channels=16),
            mask_decoder_config=dict(hidden_size=PROMPT, mlp_dim=DEC_MLP, num_hidden_layers=2,
                                     num_attention_heads=2, iou_head_hidden_dim=16, layer_norm_eps=1e-5)))
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
    assert "sam.mask_decoder.iou_token.weight" in str(error.value) and "nothing filled" in str(error.value)
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


def test_cli_reads_safetensors_and_refuses_bin(official, tmp_path):
    sd, clip = official
    (tmp_path / "release").mkdir()
    (tmp_path / "clip").mkdir()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, tmp_path / "release" / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[len(keys) // 2:]}, tmp_path / "release" / "model-00002-of-00002.safetensors")
    save_file(clip, tmp_path / "clip" / "model.safetensors")
    main(["--checkpoint", str(tmp_path / "release"), "--vision-tower", str(tmp_path / "clip"),
          "--output", str(tmp_path / "out")])
    written = load_safetensors_dir(tmp_path / "out")
    model = Holder()
    model.load_state_dict(written, strict=True)
    assert torch.equal(model.sam.vision_encoder.neck.conv1.weight, sd["model.visual_model.image_encoder.neck.0.weight"])

    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "pytorch_model-00001-of-00002.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="convert them to safetensors first"):
        main(["--checkpoint", str(tmp_path / "bins"), "--output", str(tmp_path / "out2")])
