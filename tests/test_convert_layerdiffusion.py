"""LayerDiffuse weight conversion: LDM -> diffusers UNet names (checked against diffusers' own converter), the
Forge `::lora::` and `::diff::` files, the diffusers-named offsets, the encoder / decoder files, format detection
and the CLI. All on tiny fake files with the released files' key formats."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file

from hfpapers.methods.layerdiffusion.convert_layerdiffusion import (
    apply_attn_lora, convert_attn_lora, convert_weights, detect_format, ldm_to_diffusers_unet_key,
    load_transparent_decoder, load_transparent_encoder, main, merge_diffusers_offsets, merge_weight_diffs)
from hfpapers.methods.layerdiffusion.modeling_layerdiffusion import LatentTransparencyEncoder, TransparentVAEDecoder

# SDXL's layout in small: three levels, no attention in the first, two resnets per down block, text_time embedding.
SDXL_LIKE = dict(
    sample_size=16, block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
# SD1.5's layout in small: attention in all but the last level, and one resnet per block (not SDXL's two).
SD15_LIKE = dict(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8)

# LDM module paths of the two tiny UNets, written out by hand from the LDM UNet's construction order
# (input_blocks.0 = conv_in; per level: [ResBlock, SpatialTransformer] x layers, then Downsample; the output
# blocks mirror it with one layer more, the Upsample last in the level's final block).
SDXL_LIKE_LDM = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0": "input_blocks.4.0", "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.resnets.1": "input_blocks.5.0", "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.resnets.0": "input_blocks.7.0", "down_blocks.2.attentions.0": "input_blocks.7.1",
    "down_blocks.2.resnets.1": "input_blocks.8.0", "down_blocks.2.attentions.1": "input_blocks.8.1",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0", "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.resnets.2": "output_blocks.2.0", "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.0.upsamplers.0": "output_blocks.2.2",
    "up_blocks.1.resnets.0": "output_blocks.3.0", "up_blocks.1.attentions.0": "output_blocks.3.1",
    "up_blocks.1.resnets.1": "output_blocks.4.0", "up_blocks.1.attentions.1": "output_blocks.4.1",
    "up_blocks.1.resnets.2": "output_blocks.5.0", "up_blocks.1.attentions.2": "output_blocks.5.1",
    "up_blocks.1.upsamplers.0": "output_blocks.5.2",
    "up_blocks.2.resnets.0": "output_blocks.6.0", "up_blocks.2.resnets.1": "output_blocks.7.0",
    "up_blocks.2.resnets.2": "output_blocks.8.0",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}
SD15_LIKE_LDM = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.attentions.0": "input_blocks.1.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.upsamplers.0": "output_blocks.1.1",
    "up_blocks.1.resnets.0": "output_blocks.2.0", "up_blocks.1.attentions.0": "output_blocks.2.1",
    "up_blocks.1.resnets.1": "output_blocks.3.0", "up_blocks.1.attentions.1": "output_blocks.3.1",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}
DIFFUSERS_TO_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def to_ldm(name: str, table: dict) -> str:
    """The LDM name of diffusers parameter `name`, from the hand-written module table."""
    prefix = max((p for p in table if name.startswith(p + ".")), key=len)
    rest = name[len(prefix) + 1:]
    if ".resnets." in prefix:
        module, leaf = rest.rsplit(".", 1)
        rest = f"{DIFFUSERS_TO_LDM_RESNET[module]}.{leaf}"
    return f"{table[prefix]}.{rest}"


@pytest.fixture(scope="module")
def sdxl_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**SDXL_LIKE).eval()


@pytest.fixture(scope="module")
def sd15_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_LIKE).eval()


def sdxl_inputs(in_channels: int = 4):
    generator = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, in_channels, 16, 16, generator=generator), timestep=torch.tensor([3, 700]),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=generator),
                added_cond_kwargs={"text_embeds": torch.randn(2, 16, generator=generator),
                                   "time_ids": torch.randn(2, 6, generator=generator)})


def attention_modules(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith(tuple(f".{p}" for p in ATTENTION_PROJECTIONS))]


def fake_attn_lora(unet, rank: int = 4) -> dict[str, torch.Tensor]:
    """A `layer_xl_transparent_attn`-style file for `unet`: up (`::lora::0`) and down (`::lora::1`) of every
    attention projection."""
    generator = torch.Generator().manual_seed(2)
    fake = {}
    for module_name in attention_modules(unet):
        module = unet.get_submodule(module_name)
        key = "diffusion_model." + to_ldm(f"{module_name}.weight", SDXL_LIKE_LDM)
        fake[f"{key}::lora::0"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
        fake[f"{key}::lora::1"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
    return fake


# Diffusers names -> offsets, for a spread of layers: resnets (incl. a shortcut), a downsampler, an upsampler,
# transformer internals, the embeddings, the output conv and conv_in.
DIFF_TARGETS = ("conv_in.bias", "time_embedding.linear_1.weight", "add_embedding.linear_2.bias",
                "down_blocks.0.resnets.1.conv1.weight", "down_blocks.0.downsamplers.0.conv.weight",
                "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj.weight",
                "down_blocks.2.attentions.0.proj_in.weight", "mid_block.resnets.1.time_emb_proj.bias",
                "up_blocks.0.resnets.0.conv_shortcut.weight", "up_blocks.1.upsamplers.0.conv.bias",
                "up_blocks.2.resnets.2.norm2.weight", "conv_out.weight")


def fake_diffs(unet, conv_in_channels: int | None = None) -> dict[str, torch.Tensor]:
    """Diffusers name -> offset; `conv_in_channels` adds a conv_in.weight offset with that many inputs."""
    generator = torch.Generator().manual_seed(3)
    parameters = dict(unet.named_parameters())
    diffs = {name: torch.randn(parameters[name].shape, generator=generator) for name in DIFF_TARGETS}
    if conv_in_channels:
        out_channels, _, height, width = parameters["conv_in.weight"].shape
        diffs["conv_in.weight"] = torch.randn(out_channels, conv_in_channels, height, width, generator=generator)
    return diffs


def as_forge_diff(diffs: dict) -> dict:
    return {f"diffusion_model.{to_ldm(name, SDXL_LIKE_LDM)}::diff::0": t for name, t in diffs.items()}


def same_state(unet, reference) -> bool:
    ours, theirs = unet.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# LDM -> diffusers names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("unet_fixture, table", [("sdxl_unet", SDXL_LIKE_LDM), ("sd15_unet", SD15_LIKE_LDM)])
def test_key_map_agrees_with_diffusers_converter(request, unet_fixture, table):
    unet = request.getfixturevalue(unet_fixture)
    ldm = {to_ldm(name, table): torch.empty(0) for name in unet.state_dict()}  # a distinct tensor per key
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": t for k, t in ldm.items()}, unet.config)
    assert converted.keys() == unet.state_dict().keys()  # the hand-written LDM names are the real ones
    where = {id(tensor): name for name, tensor in converted.items()}
    for key, tensor in ldm.items():
        assert ldm_to_diffusers_unet_key(key, unet.config) == where[id(tensor)], key


@pytest.mark.parametrize("key, unet_fixture", [
    ("input_blocks.9.0.in_layers.0.weight", "sdxl_unet"),  # past the last input block
    ("input_blocks.1.1.proj_in.weight", "sdxl_unet"),  # the first SDXL level has no attention
    ("output_blocks.1.1.conv.weight", "sdxl_unet"),  # the upsampler is in the level's last block
    ("output_blocks.2.1.conv.weight", "sdxl_unet"),  # ... and after the transformer
    ("input_blocks.1.0.in_layers.1.weight", "sdxl_unet"),  # in_layers.1 is the SiLU
    ("label_emb.0.0.weight", "sd15_unet"),  # SD1.5 has no size/crop embedding
    ("middle_block.3.in_layers.0.weight", "sd15_unet"),
    ("output_blocks.0.1.conv.weight", "sd15_unet"),  # one resnet per block: the upsampler is output_blocks.1.1
])
def test_key_map_rejects_keys_outside_the_layout(request, key, unet_fixture):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ldm_to_diffusers_unet_key(key, request.getfixturevalue(unet_fixture).config)


# ::lora:: ----------------------------------------------------------------------------------------------------

def test_attn_lora_matches_hand_merged_weights(sdxl_unet, tmp_path):
    fake = fake_attn_lora(sdxl_unet)
    peft_state_dict, config = convert_attn_lora(fake, sdxl_unet.config)
    assert len(peft_state_dict) == len(fake) and config.r == config.lora_alpha == 4
    assert sorted(config.target_modules) == sorted(attention_modules(sdxl_unet))

    merged = copy.deepcopy(sdxl_unet)  # W + up @ down, by hand
    with torch.no_grad():
        for module_name in attention_modules(merged):
            key = "diffusion_model." + to_ldm(f"{module_name}.weight", SDXL_LIKE_LDM)
            merged.get_submodule(module_name).weight += fake[f"{key}::lora::0"] @ fake[f"{key}::lora::1"]
    with torch.no_grad():
        expected = merged(**sdxl_inputs()).sample
        assert not torch.allclose(expected, sdxl_unet(**sdxl_inputs()).sample, atol=1e-3)

        adapted = copy.deepcopy(sdxl_unet)
        apply_attn_lora(adapted, fake)
        torch.testing.assert_close(adapted(**sdxl_inputs()).sample, expected, atol=1e-5, rtol=1e-5)
        adapted.fuse_lora()
        adapted.unload_lora()
        torch.testing.assert_close(adapted(**sdxl_inputs()).sample, expected, atol=1e-5, rtol=1e-5)

        # the converted file loads with diffusers' own LoRA loader
        assert convert_weights(fake, tmp_path, unet_config=sdxl_unet.config) == "forge_attn_lora"
        loaded = copy.deepcopy(sdxl_unet)
        loaded.load_lora_adapter(str(tmp_path / "pytorch_lora_weights.safetensors"), prefix="unet")
        torch.testing.assert_close(loaded(**sdxl_inputs()).sample, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stray, message", [
    ("diffusion_model.input_blocks.4.1.proj_in.weight::lora::0", "attention projection"),
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::2", "::lora::1"),
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::diff::0", "::lora::0"),
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "not a Forge patch key"),
    ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight::lora::0", "input_blocks.1.1"),
])
def test_attn_lora_rejects_stray_keys(sdxl_unet, stray, message):
    fake = fake_attn_lora(sdxl_unet)
    fake[stray] = torch.zeros(1, 1)
    untouched = copy.deepcopy(sdxl_unet)
    with pytest.raises(ValueError, match=message):
        apply_attn_lora(untouched, fake)
    assert not hasattr(untouched, "peft_config")


def test_attn_lora_needs_both_halves_and_fitting_shapes(sdxl_unet):
    fake = fake_attn_lora(sdxl_unet)
    half = next(key for key in fake if key.endswith("::lora::1"))
    with pytest.raises(ValueError, match="only `::lora::0`"):
        convert_attn_lora({k: v for k, v in fake.items() if k != half}, sdxl_unet.config)
    fake[half] = torch.zeros(4, 7)  # in_features 7: fits no projection
    untouched = copy.deepcopy(sdxl_unet)
    with pytest.raises(ValueError, match="does not fit"):
        apply_attn_lora(untouched, fake)
    assert not hasattr(untouched, "peft_config")


# ::diff:: and diffusers offsets ---------------------------------------------------------------------------------

def test_weight_diffs_are_added_and_conv_in_widens(sdxl_unet):
    diffs = fake_diffs(sdxl_unet, conv_in_channels=8)
    unet = copy.deepcopy(sdxl_unet)
    merge_weight_diffs(unet, as_forge_diff(diffs))
    before, after = sdxl_unet.state_dict(), unet.state_dict()
    for name in DIFF_TARGETS:
        torch.testing.assert_close(after[name], before[name] + diffs[name])
    padded = torch.cat([before["conv_in.weight"], torch.zeros_like(before["conv_in.weight"])], dim=1)
    torch.testing.assert_close(after["conv_in.weight"], padded + diffs["conv_in.weight"])
    untouched = set(before) - set(diffs)
    assert untouched and all(torch.equal(after[name], before[name]) for name in untouched)
    assert unet.config.in_channels == unet.conv_in.in_channels == 8
    with torch.no_grad():
        assert unet(**sdxl_inputs(in_channels=8)).sample.shape == (2, 4, 16, 16)


@pytest.mark.parametrize("bad", ["unmapped", "shape", "narrower_conv_in"])
def test_bad_weight_diff_leaves_the_unet_unchanged(sdxl_unet, bad):
    diffs = as_forge_diff(fake_diffs(sdxl_unet, conv_in_channels=8))
    if bad == "unmapped":
        diffs["diffusion_model.output_blocks.9.0.in_layers.0.weight::diff::0"] = torch.zeros(32)
    elif bad == "shape":
        diffs["diffusion_model.out.2.bias::diff::0"] = torch.zeros(5)
    else:
        diffs["diffusion_model.input_blocks.0.0.weight::diff::0"] = torch.zeros(32, 2, 3, 3)
    unet = copy.deepcopy(sdxl_unet)
    with pytest.raises(ValueError, match="output_blocks.9.0|conv_out.bias|conv_in.weight"):
        merge_weight_diffs(unet, diffs)
    assert same_state(unet, sdxl_unet) and unet.config.in_channels == 4


def test_diffusers_offsets(sdxl_unet):
    diffs = fake_diffs(sdxl_unet)
    unet = copy.deepcopy(sdxl_unet)
    merge_diffusers_offsets(unet, diffs)
    for name in DIFF_TARGETS:
        torch.testing.assert_close(unet.state_dict()[name], sdxl_unet.state_dict()[name] + diffs[name])

    unet = copy.deepcopy(sdxl_unet)
    with pytest.raises(ValueError, match="not_a_layer.weight: not a parameter"):
        merge_diffusers_offsets(unet, {**diffs, "not_a_layer.weight": torch.zeros(1)})
    assert same_state(unet, sdxl_unet)


def test_two_keys_for_one_weight_are_refused(sdxl_unet):
    diffs = as_forge_diff(fake_diffs(sdxl_unet))
    diffs["model.diffusion_model.out.2.weight::diff::0"] = diffs["diffusion_model.out.2.weight::diff::0"]
    with pytest.raises(ValueError, match="a second offset for conv_out.weight"):
        merge_weight_diffs(copy.deepcopy(sdxl_unet), diffs)


def test_converted_forge_diff_merges_like_the_original(sdxl_unet, tmp_path):
    forge = as_forge_diff(fake_diffs(sdxl_unet, conv_in_channels=12))
    path = tmp_path / "layer_xl_fgble2bg.safetensors"
    save_file(forge, path)
    assert convert_weights(path, tmp_path / "out", unet_config=sdxl_unet.config) == "forge_weight_diff"
    direct, via_file = copy.deepcopy(sdxl_unet), copy.deepcopy(sdxl_unet)
    merge_weight_diffs(direct, forge)
    merge_diffusers_offsets(via_file, load_file(tmp_path / "out" / "unet_offsets.safetensors"))
    assert via_file.config.in_channels == 12 and same_state(via_file, direct)


# Encoder / decoder ---------------------------------------------------------------------------------------------

SMALL_ENCODER = dict(block_out_channels=(8, 8, 16, 16))
SMALL_DECODER = dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, layers_per_block=1,
                     down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
                     up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 3)


def random_state(model) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source, scale", [("forge", 1.0), ("diffusers_cli", 300.0)])
def test_encoder_round_trip(source, scale):
    weights = random_state(LatentTransparencyEncoder(**SMALL_ENCODER))
    encoder = load_transparent_encoder(weights, source, **SMALL_ENCODER)
    assert encoder.config.offset_scale == scale
    loaded = encoder.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_released_encoder_keys():
    keys = LatentTransparencyEncoder().state_dict().keys()
    assert keys == {f"blocks.{i}.{leaf}" for i in range(0, 17, 2) for leaf in ("weight", "bias")}


def test_decoder_round_trip_and_key_errors():
    weights = random_state(TransparentVAEDecoder(**SMALL_DECODER))
    decoder = load_transparent_decoder(weights, **SMALL_DECODER)
    loaded = decoder.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)

    broken = {k: v for k, v in weights.items() if k != "latent_conv_in.bias"}
    broken["up_blocks.9.resnets.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): latent_conv_in\.bias.*unexpected keys \(1\): "
                                         r"up_blocks\.9"):
        load_transparent_decoder(broken, **SMALL_DECODER)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): conv_in\.weight"):
        load_transparent_decoder({**weights, "conv_in.weight": torch.zeros(8, 4, 3, 3)}, **SMALL_DECODER)


def test_encoder_key_errors():
    weights = random_state(LatentTransparencyEncoder(**SMALL_ENCODER))
    del weights["blocks.14.bias"]
    weights["blocks.18.weight"] = torch.zeros(1)
    with pytest.raises(ValueError,
                       match=r"missing keys \(1\): blocks\.14\.bias; unexpected keys \(1\): blocks\.18\.weight"):
        load_transparent_encoder(weights, "forge", **SMALL_ENCODER)
    with pytest.raises(ValueError, match="source must be one of"):
        load_transparent_encoder(weights, "comfy", **SMALL_ENCODER)


# Detection and the CLI -----------------------------------------------------------------------------------------

def test_detect_format(sdxl_unet):
    assert detect_format(fake_attn_lora(sdxl_unet)) == "forge_attn_lora"
    assert detect_format(as_forge_diff(fake_diffs(sdxl_unet, 8))) == "forge_weight_diff"
    assert detect_format(fake_diffs(sdxl_unet)) == "diffusers_unet_offsets"
    assert detect_format(LatentTransparencyEncoder(**SMALL_ENCODER).state_dict()) == "transparent_encoder"
    assert detect_format(TransparentVAEDecoder(**SMALL_DECODER).state_dict()) == "transparent_decoder"
    sharing = {"hookers.layers.0.to_q_lora.0.down.weight": torch.zeros(1),
               "kwargs_encoder.blocks_0.0.weight": torch.zeros(1)}
    assert detect_format(sharing) == "attention_sharing"
    with pytest.raises(ValueError, match="mixes"):
        detect_format({**fake_attn_lora(sdxl_unet), **as_forge_diff(fake_diffs(sdxl_unet))})
    with pytest.raises(ValueError, match="model.embed.weight"):
        detect_format({"model.embed.weight": torch.zeros(1)})


def test_cli_converts_the_cli_encoder_with_scale_300(tmp_path):
    weights = random_state(LatentTransparencyEncoder())
    path = tmp_path / "ld_diffusers_sdxl_vae_transparent_encoder.safetensors"
    save_file(weights, path)
    assert main([str(path), str(tmp_path / "out"), "--kind", "transparent_encoder"]) == 0
    encoder = LatentTransparencyEncoder.from_pretrained(tmp_path / "out")
    assert encoder.config.offset_scale == 300.0
    assert all(torch.equal(encoder.state_dict()[k], weights[k]) for k in weights)

    renamed = tmp_path / "my_encoder.safetensors"
    save_file(weights, renamed)
    with pytest.raises(ValueError, match="source="):
        convert_weights(renamed, tmp_path / "other")
    assert convert_weights(renamed, tmp_path / "other", source="forge") == "transparent_encoder"
    assert LatentTransparencyEncoder.from_pretrained(tmp_path / "other").config.offset_scale == 1.0


def test_cli_refusals(tmp_path, capsys):
    path = tmp_path / "layer_sd15_transparent_attn.safetensors"
    save_file({"hookers.layers.0.to_q_lora.0.down.weight": torch.zeros(2, 2)}, path)
    assert main([str(path), str(tmp_path / "out")]) == 1
    assert "load_attention_sharing" in capsys.readouterr().err
    pickle_path = tmp_path / "weights.pt"
    torch.save({"blocks.0.weight": torch.zeros(1)}, pickle_path)
    assert main([str(pickle_path), str(tmp_path / "out")]) == 1
    assert "only .safetensors" in capsys.readouterr().err
    encoder = tmp_path / "vae_transparent_encoder.safetensors"
    save_file(random_state(LatentTransparencyEncoder()), encoder)
    args = [str(encoder), str(tmp_path / "out"), "--kind", "transparent_decoder"]
    assert main(args) == 1
    assert "not transparent_decoder" in capsys.readouterr().err
