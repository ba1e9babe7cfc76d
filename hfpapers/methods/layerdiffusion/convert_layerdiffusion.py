"""Convert the released LayerDiffuse weights (arXiv 2402.17113) to diffusers / PEFT form.

The files and what becomes of them:

- Forge / ComfyUI SDXL files (HF `LayerDiffusion/layerdiffusion-v1`), keyed by LDM UNet names plus a patch tag:
  - `layer_xl_transparent_attn.safetensors`: a LoRA on the attention projections,
    `diffusion_model.<ldm path>.to_q.weight::lora::0` (up) and `::lora::1` (down), likewise to_k, to_v, to_out.0.
    It becomes a PEFT LoRA on `UNet2DConditionModel` (`convert_attn_lora`, `apply_attn_lora`).
  - `layer_xl_transparent_conv.safetensors` and the conditional `layer_xl_{fg2ble,bg2ble,fgble2bg,bgble2fg}`:
    weight offsets `<ldm key>::diff::0`, added to the UNet (`merge_weight_diffs`); the conditional ones widen
    `conv_in` to 8 or 12 input channels (noisy latent + condition latents).
  - `vae_transparent_encoder.safetensors`, `vae_transparent_decoder.safetensors` and the SD1.5
    `layer_sd15_vae_transparent_{encoder,decoder}.safetensors`: plain state dicts of the latent transparency
    encoder and the transparent decoder ("UNet1024").
- The official diffusers CLI set (HF `lllyasviel/LayerDiffuse_Diffusers`):
  - `ld_diffusers_sdxl_attn.safetensors`: offsets keyed by diffusers UNet names (`merge_diffusers_offsets`).
  - `ld_diffusers_sdxl_vae_transparent_{encoder,decoder}.safetensors`: plain state dicts as above; this encoder
    is used with its output times 300, the Forge ones as they are.
- The SD1.5 attention-sharing files (`layer_sd15_transparent_attn`, `layer_sd15_joint`, `layer_sd15_{fg2bg,bg2fg}`,
  keys `hookers.*`) are not converted here: `attention_sharing.load_attention_sharing` reads them.

Files are read with safetensors only (never `torch.load`).

    hfpapers convert layerdiffusion FILE OUTPUT_DIR [--kind KIND] [--source forge|diffusers_cli] \
        [--unet-config CONFIG_JSON]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...checkpoints import listing, load_state_dict_checked

# What `detect_format` returns, and what each kind is.
__all__ = ["FORMATS", "ldm_to_diffusers_unet_key", "convert_attn_lora", "apply_attn_lora", "convert_weight_diffs",
           "merge_weight_diffs", "merge_diffusers_offsets", "load_transparent_encoder", "load_transparent_decoder",
           "encoder_source_from_filename", "detect_format", "load_safetensors", "convert"]

FORMATS = {
    "forge_attn_lora": "LoRA on the UNet attention projections, `::lora::0/1` (layer_xl_transparent_attn)",
    "forge_weight_diff": "UNet weight offsets, `::diff::0` (layer_xl_transparent_conv, layer_xl_fg2ble, ...)",
    "diffusers_unet_offsets": "UNet weight offsets keyed by diffusers names (ld_diffusers_sdxl_attn)",
    "transparent_encoder": "latent transparency encoder (vae_transparent_encoder, ...)",
    "transparent_decoder": "transparent decoder UNet1024 (vae_transparent_decoder, ...)",
    "attention_sharing": "SD1.5 attention-sharing patcher, `hookers.*` (layer_sd15_transparent_attn, ...)",
}
# The encoder's output multiplier per weights source: the diffusers CLI multiplies its encoder's output by 300
# ("similar to LoRA's alpha to avoid initial zero-initialized outputs being too small"); Forge uses it as is.
ENCODER_OFFSET_SCALES = {"diffusers_cli": 300.0, "forge": 1.0}
# The layout fields of SDXL's UNet config: every `::lora::` / `::diff::` file released is for SDXL.
SDXL_UNET_LAYOUT = {
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "addition_embed_type": "text_time",
}
PEFT_ADAPTER_NAME = "layerdiffuse"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `pipe.load_lora_weights(folder)` looks for
OFFSETS_WEIGHT_NAME = "unet_offsets.safetensors"

UNET_PREFIX = re.compile(r"^(model\.)?diffusion_model\.")
PATCH_KEY = re.compile(r"^(?P<key>.+)::(?P<kind>[a-z]+)::(?P<index>\d+)$")
ATTN_PROJECTION_WEIGHT = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$")
# Where the weights of LDM's ResBlock go in diffusers' ResnetBlock2D.
RESNET_PARAMS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
TOP_LEVEL_PARAMS = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
TRANSFORMER_CHILDREN = ("norm.", "proj_in.", "transformer_blocks.", "proj_out.")
DIFFUSERS_UNET_PREFIXES = ("conv_in.", "time_embedding.", "add_embedding.", "class_embedding.", "down_blocks.",
                           "mid_block.", "up_blocks.", "conv_norm_out.", "conv_out.")
MIDDLE_KEY = re.compile(r"^middle_block\.(?P<m>\d+)\.(?P<rest>.+)$")
INPUT_OUTPUT_KEY = re.compile(r"^(?P<part>input_blocks|output_blocks)\.(?P<n>\d+)\.(?P<m>\d+)\.(?P<rest>.+)$")
PARAM_LEAF = re.compile(r"^(weight|bias)$")


# LDM -> diffusers UNet names ----------------------------------------------------------------------------------

def _unet_layout(unet_config: Mapping) -> tuple[dict, dict]:
    """Which diffusers block each LDM `input_blocks.N` and `output_blocks.N` is.

    input: N -> (down block i, resnet j or None for the downsampler, has attention);
    output: N -> (up block i, resnet j, has attention, holds the upsampler)."""
    down_types, up_types = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
    if len(down_types) != len(up_types):
        raise ValueError(f"unet config has {len(down_types)} down and {len(up_types)} up blocks")
    layers = unet_config["layers_per_block"]
    layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
    last = len(down_types) - 1
    inputs, index = {}, 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            inputs[index] = (i, j, "CrossAttn" in block_type)
            index += 1
        if i < last:
            inputs[index] = (i, None, False)
            index += 1
    outputs, index = {}, 0
    for i, block_type in enumerate(up_types):
        count = layers[last - i] + 1  # diffusers' up blocks have one resnet more, for the skip of the downsampler
        for j in range(count):
            outputs[index] = (i, j, "CrossAttn" in block_type, i < last and j == count - 1)
            index += 1
    return inputs, outputs


def _resnet_param(rest: str) -> str | None:
    module, _, leaf = rest.rpartition(".")
    return f"{RESNET_PARAMS[module]}.{leaf}" if module in RESNET_PARAMS and PARAM_LEAF.match(leaf) else None


def _transformer_param(rest: str) -> bool:
    """Whether `rest` is inside LDM's SpatialTransformer, whose names diffusers' Transformer2DModel keeps."""
    return rest.startswith(TRANSFORMER_CHILDREN)


def _embedding_module(unet_config: Mapping) -> str | None:
    """Where LDM's `label_emb.0` (SDXL's size/crop embedding, or a class embedding) lives in diffusers."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "add_embedding"
    if unet_config.get("class_embed_type") in ("timestep", "projection"):
        return "class_embedding"
    return None


def ldm_to_diffusers_unet_key(key: str, unet_config: Mapping) -> str:
    """The `UNet2DConditionModel` parameter name of the LDM / SGM UNet parameter `key` (without the
    `diffusion_model.` prefix), for the block layout in `unet_config` (a diffusers UNet config: its
    `layers_per_block`, `down_block_types`, `up_block_types`, `mid_block_type`, embedding types).

    Transformer internals keep their names; ResBlock parameters are renamed (in_layers.0 -> norm1, ...).
    Raises ValueError naming `key` when it has no place in that UNet."""
    module, _, leaf = key.rpartition(".")
    name = None
    if module in TOP_LEVEL_PARAMS and PARAM_LEAF.match(leaf):
        name = f"{TOP_LEVEL_PARAMS[module]}.{leaf}"
    elif module in ("label_emb.0.0", "label_emb.0.2") and PARAM_LEAF.match(leaf):
        embedding = _embedding_module(unet_config)
        name = embedding and f"{embedding}.linear_{1 if module.endswith('0.0') else 2}.{leaf}"
    elif match := MIDDLE_KEY.match(key):
        name = _middle_key(int(match["m"]), match["rest"], unet_config)
    elif match := INPUT_OUTPUT_KEY.match(key):
        inputs, outputs = _unet_layout(unet_config)
        n, m, rest = int(match["n"]), int(match["m"]), match["rest"]
        if match["part"] == "input_blocks" and n in inputs:
            name = _input_key(*inputs[n], m, rest)
        elif match["part"] == "output_blocks" and n in outputs:
            name = _output_key(*outputs[n], m, rest)
    if name is None:
        raise ValueError(f"{key!r} is not a parameter of a UNet with this layout ({_layout_summary(unet_config)})")
    return name


def _middle_key(m: int, rest: str, unet_config: Mapping) -> str | None:
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        return None
    if m in (0, 2):  # resnet, transformer, resnet
        resnet = _resnet_param(rest)
        return resnet and f"mid_block.resnets.{m // 2}.{resnet}"
    return f"mid_block.attentions.0.{rest}" if m == 1 and _transformer_param(rest) else None


def _input_key(i: int, j: int | None, has_attention: bool, m: int, rest: str) -> str | None:
    if j is None:  # the downsampler, `input_blocks.N.0.op`
        match = re.match(r"^op\.(weight|bias)$", rest)
        return f"down_blocks.{i}.downsamplers.0.conv.{match[1]}" if m == 0 and match else None
    if m == 0:
        resnet = _resnet_param(rest)
        return resnet and f"down_blocks.{i}.resnets.{j}.{resnet}"
    return f"down_blocks.{i}.attentions.{j}.{rest}" if m == 1 and has_attention and _transformer_param(rest) else None


def _output_key(i: int, j: int, has_attention: bool, has_upsampler: bool, m: int, rest: str) -> str | None:
    if m == 0:
        resnet = _resnet_param(rest)
        return resnet and f"up_blocks.{i}.resnets.{j}.{resnet}"
    if m == 1 and has_attention and _transformer_param(rest):
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    # the upsampler comes after the resnet, and after the transformer when there is one
    if has_upsampler and m == 1 + has_attention and re.match(r"^conv\.(weight|bias)$", rest):
        return f"up_blocks.{i}.upsamplers.0.{rest}"
    return None


def _layout_summary(unet_config: Mapping) -> str:
    return (f"layers_per_block={unet_config['layers_per_block']}, down_block_types="
            f"{tuple(unet_config['down_block_types'])}, up_block_types={tuple(unet_config['up_block_types'])}")


def _joined(errors: list[str], limit: int = 10) -> str:
    return "; ".join(errors[:limit]) + (f"; ... ({len(errors) - limit} more)" if len(errors) > limit else "")


def _parse_patch_key(key: str) -> tuple[str, str, int]:
    """`diffusion_model.<ldm key>::<kind>::<index>` -> (ldm key, kind, index)."""
    match = PATCH_KEY.match(key)
    if not match:
        raise ValueError(f"{key!r} is not a Forge patch key `<ldm key>::<kind>::<index>`")
    return UNET_PREFIX.sub("", match["key"]), match["kind"], int(match["index"])


# ::lora:: -> PEFT ----------------------------------------------------------------------------------------------

def convert_attn_lora(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping):
    """The Forge attention LoRA (`layer_xl_transparent_attn`) as a PEFT LoRA for a diffusers UNet with the
    layout of `unet_config`.

    Returns (state dict with keys `<diffusers module>.lora_A.weight` / `.lora_B.weight`, `LoraConfig`). Forge
    adds `up @ down` unscaled, so lora_alpha = rank (PEFT scale 1); `::lora::0` is up (lora_B), `::lora::1`
    down (lora_A). Every key must be the up or down of a q/k/v/out projection, each with both halves."""
    from peft import LoraConfig

    halves: dict[str, dict[int, torch.Tensor]] = {}
    errors = []
    for key, tensor in state_dict.items():
        try:
            ldm_key, kind, index = _parse_patch_key(key)
            if kind != "lora" or index not in (0, 1) or not ATTN_PROJECTION_WEIGHT.search(ldm_key):
                raise ValueError(f"{key!r} is not `::lora::0` or `::lora::1` of an attention projection "
                                 "(to_q, to_k, to_v, to_out.0)")
            module = ldm_to_diffusers_unet_key(ldm_key, unet_config).removesuffix(".weight")
            if index in halves.get(module, {}):
                raise ValueError(f"{key!r}: a second `::lora::{index}` for {module}")
        except ValueError as error:
            errors.append(str(error))
            continue
        halves.setdefault(module, {})[index] = tensor
    ranks = {}
    for module, pair in halves.items():
        if len(pair) != 2:
            errors.append(f"{module}: has only `::lora::{next(iter(pair))}`; a LoRA needs both up (0) and down (1)")
        elif pair[0].dim() != 2 or pair[1].dim() != 2 or pair[0].shape[1] != pair[1].shape[0]:
            errors.append(f"{module}: up {tuple(pair[0].shape)} and down {tuple(pair[1].shape)} are not the two "
                          "halves of one LoRA (up: out x rank, down: rank x in)")
        else:
            ranks[module] = pair[1].shape[0]
    if errors:
        raise ValueError(f"not a LayerDiffuse attention LoRA: {_joined(errors)}")
    if not halves:
        raise ValueError("the state dict is empty")
    peft_state_dict = {}
    for module, pair in halves.items():
        peft_state_dict[f"{module}.lora_A.weight"] = pair[1]
        peft_state_dict[f"{module}.lora_B.weight"] = pair[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    other_ranks = {module: r for module, r in ranks.items() if r != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(halves),
                        rank_pattern=other_ranks, alpha_pattern=dict(other_ranks))
    return peft_state_dict, config


def apply_attn_lora(unet, state_dict: Mapping[str, torch.Tensor], adapter_name: str = PEFT_ADAPTER_NAME):
    """Add the Forge attention LoRA to `unet` (a `UNet2DConditionModel`) as the PEFT adapter `adapter_name`;
    `unet.fuse_lora()`, `set_adapters`, `unload_lora()` then work as for any diffusers LoRA.

    Every projection is checked against the UNet (exists, is a Linear of matching size) before the UNet is
    touched. Returns the `LoraConfig`."""
    from peft import set_peft_model_state_dict

    peft_state_dict, config = convert_attn_lora(state_dict, unet.config)
    errors = []
    for module_name in config.target_modules:
        try:
            module = unet.get_submodule(module_name)
        except AttributeError:
            errors.append(f"{module_name}: not in the UNet")
            continue
        down = peft_state_dict[f"{module_name}.lora_A.weight"]
        up = peft_state_dict[f"{module_name}.lora_B.weight"]
        if not isinstance(module, torch.nn.Linear) or (up.shape[0], down.shape[1]) != (module.out_features,
                                                                                       module.in_features):
            errors.append(f"{module_name}: LoRA {down.shape[1]} -> {up.shape[0]} does not fit "
                          f"{type(module).__name__} {getattr(module, 'in_features', '?')} -> "
                          f"{getattr(module, 'out_features', '?')}")
    if errors:
        raise ValueError(f"the LoRA does not fit this UNet: {_joined(errors)}")
    unet.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(unet, peft_state_dict, adapter_name=adapter_name)
    if result.unexpected_keys:  # cannot happen after the checks above; would mean a silently unused weight
        raise ValueError(f"PEFT did not use: {listing(result.unexpected_keys)}")
    return config


# ::diff:: and diffusers offsets -> merged UNet -----------------------------------------------------------------

def convert_weight_diffs(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """A Forge `::diff::0` state dict re-keyed by diffusers UNet names (the offsets themselves unchanged)."""
    converted, errors = {}, []
    for key, tensor in state_dict.items():
        try:
            ldm_key, kind, index = _parse_patch_key(key)
            if (kind, index) != ("diff", 0):
                raise ValueError(f"{key!r} is not a `::diff::0` weight offset")
            name = ldm_to_diffusers_unet_key(ldm_key, unet_config)
            if name in converted:
                raise ValueError(f"{key!r}: a second offset for {name}")
            converted[name] = tensor
        except ValueError as error:
            errors.append(str(error))
    if errors:
        raise ValueError(f"not a LayerDiffuse weight-offset file: {_joined(errors)}")
    return converted


def merge_weight_diffs(unet, state_dict: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
    """Add a Forge `::diff::0` file (`layer_xl_transparent_conv`, `layer_xl_fg2ble`, ...) to `unet` in place:
    W <- W + scale * diff. A `conv_in` offset with more input channels (8 or 12: the condition latents
    concatenated to the noisy one) widens `unet.conv_in`, the old weight zero-padded on the new channels, and
    sets `unet.config.in_channels`. Nothing changes unless every key fits."""
    merge_diffusers_offsets(unet, convert_weight_diffs(state_dict, unet.config), scale)


def merge_diffusers_offsets(unet, state_dict: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
    """Add offsets keyed by diffusers UNet parameter names (`ld_diffusers_sdxl_attn`, or a converted
    `::diff::` file) to `unet` in place: W <- W + scale * offset, widening `conv_in` as `merge_weight_diffs`.
    Every key is checked (a parameter of the UNet, same shape) before any weight changes."""
    parameters = dict(unet.named_parameters())
    errors = []
    for key, offset in state_dict.items():
        if key not in parameters:
            errors.append(f"{key}: not a parameter of the UNet")
        elif offset.shape != parameters[key].shape and not _widens_conv_in(key, parameters[key], offset):
            errors.append(f"{key}: offset {tuple(offset.shape)} for weight {tuple(parameters[key].shape)}")
    if errors:
        raise ValueError(f"the offsets do not fit this UNet, nothing was merged: {_joined(errors)}")
    with torch.no_grad():
        for key, offset in state_dict.items():
            if offset.shape != parameters[key].shape:
                _widen_conv_in(unet, offset.shape[1])
                parameters[key] = unet.conv_in.weight
            parameters[key].add_(offset.to(parameters[key]), alpha=scale)


def _widens_conv_in(key: str, weight: torch.Tensor, offset: torch.Tensor) -> bool:
    """Whether `offset` is a conv_in weight with more input channels than `weight` and otherwise its shape."""
    return key == "conv_in.weight" and offset.dim() == 4 and offset.shape[1] > weight.shape[1] and \
        offset.shape[:1] + offset.shape[2:] == weight.shape[:1] + weight.shape[2:]


def _widen_conv_in(unet, in_channels: int) -> None:
    """Give `unet.conv_in` `in_channels` inputs; the new channels start with zero weights (Forge's `pad_weight`)."""
    old = unet.conv_in
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                          old.groups, old.bias is not None, old.padding_mode, device=old.weight.device,
                          dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, :old.in_channels] = old.weight
    if old.bias is not None:
        new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


# Encoder / decoder --------------------------------------------------------------------------------------------

def load_transparent_encoder(state_dict: Mapping[str, torch.Tensor], source: str, **config):
    """A `LatentTransparencyEncoder` holding an encoder file's weights. `source` says whose file it is and so
    its offset scale: "diffusers_cli" (`ld_diffusers_sdxl_vae_transparent_encoder`, x300) or "forge"
    (`vae_transparent_encoder`, `layer_sd15_vae_transparent_encoder`, x1). `config` overrides the default
    (released) architecture. Raises ValueError listing missing and unexpected keys."""
    from .modeling_layerdiffusion import LatentTransparencyEncoder

    if source not in ENCODER_OFFSET_SCALES:
        raise ValueError(f"source must be one of {sorted(ENCODER_OFFSET_SCALES)}, got {source!r}")
    model = LatentTransparencyEncoder(offset_scale=ENCODER_OFFSET_SCALES[source], **config)
    return load_state_dict_checked(model, state_dict, "the LatentTransparencyEncoder weights").eval()


def load_transparent_decoder(state_dict: Mapping[str, torch.Tensor], **config):
    """A `TransparentVAEDecoder` holding a decoder file's weights (`vae_transparent_decoder`,
    `layer_sd15_vae_transparent_decoder`, `ld_diffusers_sdxl_vae_transparent_decoder`). `config` overrides the
    default (released) architecture. Raises ValueError listing missing and unexpected keys."""
    from .modeling_layerdiffusion import TransparentVAEDecoder

    decoder = TransparentVAEDecoder(**config)
    return load_state_dict_checked(decoder, state_dict, "the TransparentVAEDecoder weights").eval()


def encoder_source_from_filename(path: str | Path) -> str:
    """An encoder file's source from its name: "diffusers_cli" for the CLI's `ld_diffusers_*` encoder, "forge"
    for the `layerdiffusion-v1` ones. The two have the same keys, so only the name tells them apart."""
    name = Path(path).name
    if name.startswith("ld_diffusers_"):
        return "diffusers_cli"
    if name in ("vae_transparent_encoder.safetensors", "layer_sd15_vae_transparent_encoder.safetensors"):
        return "forge"
    raise ValueError(f"cannot tell from the name {name!r} whether this encoder is the diffusers CLI's (used with "
                     "offset scale 300) or Forge's (scale 1): pass source='diffusers_cli' or 'forge' (--source)")


# Telling files apart and converting them ----------------------------------------------------------------------

def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which of `FORMATS` a released state dict is, from its keys alone."""
    keys = list(state_dict)
    if not keys:
        raise ValueError("the state dict is empty")
    if any(key.startswith("hookers.") for key in keys):
        return "attention_sharing"
    # the Forge patch tag of each key, None for a plain key
    patch_kinds = {match["kind"] if (match := PATCH_KEY.match(key)) else None for key in keys}
    if patch_kinds == {"lora"}:
        return "forge_attn_lora"
    if patch_kinds == {"diff"}:
        return "forge_weight_diff"
    if patch_kinds != {None}:
        raise ValueError(f"a Forge patch file must hold only `::lora::` or only `::diff::` keys; this one mixes "
                         f"{sorted(kind or 'plain keys' for kind in patch_kinds)}")
    if all(re.match(r"^blocks\.\d+\.(weight|bias)$", key) for key in keys):
        return "transparent_encoder"
    if "latent_conv_in.weight" in state_dict:
        return "transparent_decoder"
    if all(key.startswith(DIFFUSERS_UNET_PREFIXES) for key in keys):
        return "diffusers_unet_offsets"
    raise ValueError(f"not a LayerDiffuse weights file this module knows; keys: {listing(keys)}")


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are read (the released LayerDiffuse weights all are)")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} could not be read as safetensors: {error}") from error


def convert_weights(weights: str | Path | Mapping[str, torch.Tensor], output_dir: str | Path,
                    kind: str | None = None, source: str | None = None, unet_config: Mapping | None = None) -> str:
    """Convert a released file (a path, or its state dict) into `output_dir`; returns its kind (`FORMATS`).

    - encoder / decoder: a `save_pretrained` folder of our model. The encoder's `source` (see
      `load_transparent_encoder`) defaults to what the file name says.
    - attention LoRA: `pytorch_lora_weights.safetensors` (diffusers LoRA format, PEFT keys and config), for
      `pipe.load_lora_weights(output_dir)` or `unet.load_lora_adapter(..., prefix="unet")`.
    - `::diff::` offsets: `unet_offsets.safetensors` keyed by diffusers names, for `merge_diffusers_offsets`.
    `kind`, when given, must match the detected one. `unet_config` (the UNet layout for the `::` files)
    defaults to SDXL's."""
    state_dict = weights if isinstance(weights, Mapping) else load_safetensors(weights)
    detected = detect_format(state_dict)
    if kind is not None and kind != detected:
        raise ValueError(f"the weights are {detected} ({FORMATS[detected]}), not {kind}")
    unet_config = SDXL_UNET_LAYOUT if unet_config is None else unet_config
    output_dir = Path(output_dir)
    if detected == "attention_sharing":
        raise ValueError("SD1.5 attention-sharing weights (hookers.*) are loaded, not converted: use "
                         "hfpapers.methods.layerdiffusion.attention_sharing.load_attention_sharing")
    if detected == "diffusers_unet_offsets":
        raise ValueError("these offsets are keyed by diffusers names already: merge them into the UNet with "
                         "merge_diffusers_offsets(unet, state_dict)")
    if detected == "transparent_encoder":
        if source is None:
            if isinstance(weights, Mapping):
                raise ValueError("pass source='diffusers_cli' or 'forge' for an encoder given as a state dict")
            source = encoder_source_from_filename(weights)
        load_transparent_encoder(state_dict, source).save_pretrained(output_dir)
    elif detected == "transparent_decoder":
        load_transparent_decoder(state_dict).save_pretrained(output_dir)
    elif detected == "forge_attn_lora":
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

        peft_state_dict, config = convert_attn_lora(state_dict, unet_config)
        StableDiffusionXLLoraLoaderMixin.save_lora_weights(output_dir, unet_lora_layers=peft_state_dict,
                                                           weight_name=LORA_WEIGHT_NAME,
                                                           unet_lora_adapter_metadata=config.to_dict())
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        offsets = {key: tensor.contiguous() for key, tensor in convert_weight_diffs(state_dict, unet_config).items()}
        save_file(offsets, output_dir / OFFSETS_WEIGHT_NAME, metadata={"format": "pt"})
    return detected


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hfpapers convert layerdiffusion FILE OUTPUT_DIR` (FILE: a released .safetensors file)."""
    parser.add_argument("--kind", choices=sorted(FORMATS), help="expected kind (default: detected from the keys)")
    parser.add_argument("--source", choices=sorted(ENCODER_OFFSET_SCALES),
                        help="whose encoder file this is (sets the offset scale); default: from the file name")
    parser.add_argument("--unet-config", help="a diffusers UNet config.json whose layout the `::` keys follow "
                                              "(default: SDXL)")


def convert(checkpoint: str | Path, output_dir: str | Path, kind: str | None = None, source: str | None = None,
            unet_config: str | Path | None = None) -> str:
    """`convert_weights` for `hfpapers convert` (`unet_config`: a config.json path): returns what was written."""
    layout = json.loads(Path(unet_config).read_text()) if unet_config else None
    kind = convert_weights(checkpoint, output_dir, kind, source, layout)
    return f"wrote {kind} ({FORMATS[kind]}) to {output_dir}"


def main(argv: list[str] | None = None) -> int:
    """`python -m hfpapers.methods.layerdiffusion.convert_layerdiffusion ...`: `hfpapers convert layerdiffusion ...`."""
    from ...cli import main as cli_main

    return cli_main(["convert", "layerdiffusion", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
