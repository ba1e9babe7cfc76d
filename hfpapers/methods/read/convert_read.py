"""Convert a released READ checkpoint (github.com/rui-qian/READ; LISA and SESAME checkpoints share the layout) to the
state dict of `READForReasoningSegmentation` (children `llava`, `sam`, `text_hidden_fcs`).

What the released checkpoints hold. `merge_lora_weights_and_save_hf_model.py` merges the LoRA, then saves
`READForCausalLM.state_dict()` with `save_pretrained` (transformers 4.31: `pytorch_model-*.bin` shards, bf16),
*leaving out every key that contains "vision_tower"*. So a release has

    model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight     the Llama LM (Vicuna)
    model.mm_projector.{0,2}.{weight,bias}                                             LLaVA-1.5's 2-layer MLP
    model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*                   SAM ViT-H, official names
    model.text_hidden_fcs.0.{0,2}.{weight,bias}                                        the [SEG] projection

but not the CLIP tower, which the official code loads from `--vision_tower` (openai/clip-vit-large-patch14-336,
frozen, never trained). Pass that checkpoint as `vision_tower_state_dict` (CLIPModel or CLIPVisionModel keys, with or
without `vision_model.`); a READ checkpoint that does carry `model.vision_tower.vision_tower.vision_model.*` (an
unfiltered save) is converted as well.

Only renaming is needed: every official SAM tensor has the shape of its transformers `SamModel` counterpart
(checked by `tests/test_convert_read.py` and by a parity run of the official modules against `SamModel`). The one
official tensor that feeds two of ours is SAM's random-Fourier matrix, which `SamModel` keeps twice (tied).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ...checkpoints import listing, strip_wrapper_prefixes

EXPECTED_LAYOUT = (
    "a merged READ/LISA/SESAME checkpoint as merge_lora_weights_and_save_hf_model.py writes it: model.embed_tokens.*, "
    "model.layers.N.*, model.norm.weight, lm_head.weight, model.mm_projector.{0,2}.*, "
    "model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*, model.text_hidden_fcs.0.{0,2}.* "
    "(and optionally model.vision_tower.vision_tower.vision_model.*)"
)
CLIP_HINT = (
    "the released READ checkpoints do not contain the CLIP tower (merge_lora_weights_and_save_hf_model.py drops "
    "every 'vision_tower' key); pass the weights of the base CLIP (openai/clip-vit-large-patch14-336, or the "
    "vision tower of the base LLaVA-1.5) as vision_tower_state_dict"
)

# --- the language model side ------------------------------------------------------------------------------------

LLAVA_RULES = [
    (r"model\.embed_tokens\.weight", r"llava.model.language_model.embed_tokens.weight"),
    (r"model\.norm\.weight", r"llava.model.language_model.norm.weight"),
    (r"lm_head\.weight", r"llava.lm_head.weight"),
    (r"model\.layers\.(\d+)\.((?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(?:weight|bias))",
     r"llava.model.language_model.layers.\1.\2"),
    (r"model\.layers\.(\d+)\.((?:input|post_attention)_layernorm\.weight)", r"llava.model.language_model.layers.\1.\2"),
    (r"model\.mm_projector\.0\.(weight|bias)", r"llava.model.multi_modal_projector.linear_1.\1"),
    (r"model\.mm_projector\.2\.(weight|bias)", r"llava.model.multi_modal_projector.linear_2.\1"),
    (r"model\.text_hidden_fcs\.0\.([02])\.(weight|bias)", r"text_hidden_fcs.\1.\2"),
]
# transformers 5 keeps CLIPVisionModel's weights without the `vision_model.` level.
CLIP_TOWER = "llava.model.vision_tower."
CLIP_PARAM = re.compile(
    r"embeddings\.(?:class_embedding|patch_embedding\.weight|position_embedding\.weight)"
    r"|(?:pre_layrnorm|post_layernorm)\.(?:weight|bias)"
    r"|encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(?:weight|bias)"
)
READ_CLIP_PREFIX = "model.vision_tower.vision_tower."

# Buffers that the modules recompute and that old saves may still carry: RoPE frequencies (transformers < 4.31),
# CLIP's position ids, SAM's pixel normalisation (non-persistent officially; ours lives in the image processor).
DROPPED = re.compile(r".*rotary_emb\.inv_freq|.*embeddings\.position_ids|model\.visual_model\.pixel_(?:mean|std)")

# --- SAM ----------------------------------------------------------------------------------------------------------

SAM_PREFIX = "model.visual_model."
SAM_RULES = [
    # image encoder (ViTDet backbone)
    (r"image_encoder\.pos_embed", r"vision_encoder.pos_embed"),
    (r"image_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_encoder.patch_embed.projection.\1"),
    (r"image_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_encoder.layers.\1.layer_norm\2.\3"),
    (r"image_encoder\.blocks\.(\d+)\.attn\.((?:qkv|proj)\.(?:weight|bias)|rel_pos_[hw])",
     r"vision_encoder.layers.\1.attn.\2"),
    (r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12]\.(?:weight|bias))", r"vision_encoder.layers.\1.mlp.\2"),
    (r"image_encoder\.neck\.0\.weight", r"vision_encoder.neck.conv1.weight"),
    (r"image_encoder\.neck\.1\.(weight|bias)", r"vision_encoder.neck.layer_norm1.\1"),
    (r"image_encoder\.neck\.2\.weight", r"vision_encoder.neck.conv2.weight"),
    (r"image_encoder\.neck\.3\.(weight|bias)", r"vision_encoder.neck.layer_norm2.\1"),
    # prompt encoder
    (r"prompt_encoder\.point_embeddings\.([0-3])\.weight", r"prompt_encoder.point_embed.\1.weight"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (r"prompt_encoder\.mask_downscaling\.0\.(weight|bias)", r"prompt_encoder.mask_embed.conv1.\1"),
    (r"prompt_encoder\.mask_downscaling\.1\.(weight|bias)", r"prompt_encoder.mask_embed.layer_norm1.\1"),
    (r"prompt_encoder\.mask_downscaling\.3\.(weight|bias)", r"prompt_encoder.mask_embed.conv2.\1"),
    (r"prompt_encoder\.mask_downscaling\.4\.(weight|bias)", r"prompt_encoder.mask_embed.layer_norm2.\1"),
    (r"prompt_encoder\.mask_downscaling\.6\.(weight|bias)", r"prompt_encoder.mask_embed.conv3.\1"),
    # mask decoder (two-way transformer, upscaling, heads)
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\."
     r"((?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\.(?:q|k|v|out)_proj\.(?:weight|bias))",
     r"mask_decoder.transformer.layers.\1.\2"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12]\.(?:weight|bias))",
     r"mask_decoder.transformer.layers.\1.mlp.\2"),
    (r"mask_decoder\.transformer\.final_attn_token_to_image\.((?:q|k|v|out)_proj\.(?:weight|bias))",
     r"mask_decoder.transformer.final_attn_token_to_image.\1"),
    (r"mask_decoder\.transformer\.norm_final_attn\.(weight|bias)",
     r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    (r"mask_decoder\.output_upscaling\.0\.(weight|bias)", r"mask_decoder.upscale_conv1.\1"),
    (r"mask_decoder\.output_upscaling\.1\.(weight|bias)", r"mask_decoder.upscale_layer_norm.\1"),
    (r"mask_decoder\.output_upscaling\.3\.(weight|bias)", r"mask_decoder.upscale_conv2.\1"),
]
# SAM's random Fourier features: one official buffer, two (tied) SamModel parameters.
SAM_GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
SAM_GAUSSIAN_TARGETS = ("shared_image_embedding.positional_embedding",
                        "prompt_encoder.shared_embedding.positional_embedding")
# The official MLP heads keep their linears in `layers.0..L-1`; SamFeedForward names them proj_in, layers.0..L-3,
# proj_out.
SAM_MLP = re.compile(
    r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(weight|bias)")


def _compile(rules):
    return [(re.compile(pattern), target) for pattern, target in rules]


_LLAVA_RULES, _SAM_RULES = _compile(LLAVA_RULES), _compile(SAM_RULES)


def _apply(rules, key: str) -> str | None:
    for pattern, target in rules:
        if match := pattern.fullmatch(key):
            return match.expand(target)
    return None


def convert_sam_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official `segment_anything` `Sam` keys (no prefix) -> transformers `SamModel` keys; also the keys it could
    not map. The depth of each MLP head is read off the keys present."""
    depth: dict[str, int] = {}
    for key in state_dict:
        if match := SAM_MLP.fullmatch(key):
            depth[match[1]] = max(depth.get(match[1], 0), int(match[2]) + 1)
    converted, unmapped = {}, []
    for key, tensor in state_dict.items():
        if key == SAM_GAUSSIAN:
            converted.update(dict.fromkeys(SAM_GAUSSIAN_TARGETS, tensor))
        elif match := SAM_MLP.fullmatch(key):
            head, index, kind = match[1], int(match[2]), match[3]
            last = depth[head] - 1
            name = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
            converted[f"{head}.{name}.{kind}"] = tensor
        elif (target := _apply(_SAM_RULES, key)) is not None:
            converted[target] = tensor
        else:
            unmapped.append(key)
    return converted, unmapped


def convert_clip_vision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP checkpoint (CLIPModel, or CLIPVisionModel of transformers 4 or 5) -> our `llava.model.vision_tower.*`.
    The text tower and the projection heads of a full CLIPModel are dropped."""
    converted, unmapped = {}, []
    for key, tensor in strip_wrapper_prefixes(state_dict).items():
        name = key.removeprefix(READ_CLIP_PREFIX)
        if name.startswith(("text_model.", "text_projection.", "visual_projection.")) or name == "logit_scale":
            continue
        name = name.removeprefix("vision_model.")
        if DROPPED.fullmatch(name):
            continue
        if CLIP_PARAM.fullmatch(name):
            converted[CLIP_TOWER + name] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"{len(unmapped)} keys of the vision tower checkpoint are not CLIP vision-tower weights: "
                         f"{listing(unmapped, 20)}. Expected a CLIPModel / CLIPVisionModel state dict "
                         "(vision_model.embeddings.*, vision_model.encoder.layers.N.*, vision_model.pre_layrnorm.*, "
                         "...)")
    if not converted:
        raise ValueError("the vision tower checkpoint holds no CLIP vision weights (vision_model.*)")
    return converted


def convert_read_state_dict(state_dict: Mapping[str, torch.Tensor], *,
                            vision_tower_state_dict: Mapping[str, torch.Tensor] | None = None,
                            ) -> dict[str, torch.Tensor]:
    """Every key of a released READ checkpoint -> our key (see the module docstring for the layout). The CLIP tower,
    absent from releases, comes from `vision_tower_state_dict` when given. Raises one ValueError naming every key
    that has no mapping."""
    state_dict = strip_wrapper_prefixes(state_dict)
    converted: dict[str, torch.Tensor] = {}
    sam, clip, unmapped = {}, {}, []
    for key, tensor in state_dict.items():
        if DROPPED.fullmatch(key):
            continue
        if key.startswith(SAM_PREFIX):
            sam[key.removeprefix(SAM_PREFIX)] = tensor
        elif key.startswith(READ_CLIP_PREFIX):
            clip[key] = tensor
        elif (target := _apply(_LLAVA_RULES, key)) is not None:
            converted[target] = tensor
        else:
            unmapped.append(key)
    sam_converted, sam_unmapped = convert_sam_state_dict(sam)
    converted.update({f"sam.{key}": tensor for key, tensor in sam_converted.items()})
    unmapped += [SAM_PREFIX + key for key in sam_unmapped]
    if unmapped:
        hint = ""
        if any(re.search(r"lora_[AB]|base_layer|^base_model\.model\.", key) for key in unmapped):
            hint = (" LoRA keys (lora_A/lora_B/base_layer, base_model.model.*) mean the checkpoint is an unmerged "
                    "training state: run the official merge_lora_weights_and_save_hf_model.py first.")
        raise ValueError(f"{len(unmapped)} of {len(state_dict)} checkpoint keys have no mapping: "
                         f"{listing(unmapped, 20)}. Expected {EXPECTED_LAYOUT}.{hint}")
    if clip:
        converted.update(convert_clip_vision_state_dict(clip))
    if vision_tower_state_dict is not None:
        converted.update(convert_clip_vision_state_dict(vision_tower_state_dict))
    return converted


VOCAB_KEYS = ("llava.model.language_model.embed_tokens.weight", "llava.lm_head.weight")


def remap_vocabulary(converted: Mapping[str, torch.Tensor], vocab_size: int,
                     moved_rows: Mapping[int, int | None] | None = None) -> dict[str, torch.Tensor]:
    """Fit the token embeddings and LM head of a converted release to our vocabulary.

    A release's vocabulary is Vicuna's 32,000 tokens then the ones `init_READ_model` adds: `[SEG]` (32000) and, with
    `use_mm_start_end` (the default), `<im_start>` / `<im_end>` (32001, 32002). `moved_rows` sends official row i
    to row `moved_rows[i]` (None drops it); other rows keep their index. Our rows that nothing fills (e.g. an
    `<image>` placeholder) get the mean of the official rows, as LLaVA initialises added tokens."""
    moved_rows = dict(moved_rows or {})
    out = dict(converted)
    for key in VOCAB_KEYS:
        if key not in out:
            continue
        old = out[key]
        pairs = [(i, moved_rows.get(i, i)) for i in range(old.shape[0])]
        pairs = [(i, j) for i, j in pairs if j is not None]
        if bad := [f"{i}->{j}" for i, j in pairs if not 0 <= j < vocab_size]:
            raise ValueError(f"{key}: rows {listing(bad)} fall outside the new vocabulary of {vocab_size}")
        if len({j for _, j in pairs}) != len(pairs):
            raise ValueError(f"{key}: two official rows are sent to the same row ({moved_rows})")
        new = old.mean(0, keepdim=True).repeat(vocab_size, 1)
        new[torch.tensor([j for _, j in pairs])] = old[torch.tensor([i for i, _ in pairs])]
        out[key] = new
    return out


def _fit_to_adapters(converted: dict[str, torch.Tensor], model: nn.Module, target: Mapping[str, torch.Tensor]):
    """Our keys onto a model whose language model carries peft adapters (LoRA `base_layer`, trainable tokens): the
    base weights go under `base_layer`, a trainable-tokens delta (which holds whole rows) is refilled from the loaded
    embedding, LoRA factors are kept (they must be a no-op, lora_B = 0, since a release's LoRA is already merged)."""
    fitted, kept = dict(converted), []
    for key in target:
        if key in fitted:
            continue
        for wrapper in (".token_adapter.base_layer.", ".base_layer."):
            if wrapper in key and (plain := key.replace(wrapper, ".", 1)) in converted:
                fitted[key] = fitted.pop(plain)
                break
    for key in target:
        if key in fitted:
            continue
        if match := re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta\.([^.]+)", key):
            weight = converted.get(f"{match[1]}.weight")
            if weight is not None:
                indices = model.get_submodule(f"{match[1]}.token_adapter").token_indices[match[2]]
                fitted[key] = weight[torch.as_tensor(indices)]
        elif re.search(r"\.lora_[AB]\.|\.lora_embedding_[AB]\.", key):
            if ".lora_B." in key or ".lora_embedding_B." in key:
                if target[key].abs().max().item() != 0:
                    raise ValueError(f"{key} is not zero: the model's LoRA is not a no-op, so loading merged "
                                     "weights under it would apply the LoRA twice; load into a fresh model")
            fitted[key] = target[key]
            kept.append(key)
    return fitted, kept


def load_converted(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                   vision_tower_state_dict: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Convert a released READ checkpoint and load it strictly into `model` (children `llava`, `sam`,
    `text_hidden_fcs`). Raises one ValueError listing the model keys nothing filled, the converted keys the model
    lacks and the shape mismatches. Returns the adapter (LoRA) keys left as the model had them."""
    converted = convert_read_state_dict(state_dict, vision_tower_state_dict=vision_tower_state_dict)
    target = model.state_dict()
    converted, kept = _fit_to_adapters(converted, model, target)
    missing = [key for key in target if key not in converted]
    unexpected = [key for key in converted if key not in target]
    mismatched = [f"{key} {tuple(converted[key].shape)} vs model {tuple(target[key].shape)}"
                  for key in converted if key in target and converted[key].shape != target[key].shape]
    if missing or unexpected or mismatched:
        lines = ["the converted READ checkpoint does not fit the model:"]
        if missing:
            lines.append(f"  {len(missing)} model keys nothing filled: {listing(missing, 20)}")
            if any(key.startswith(CLIP_TOWER) for key in missing):
                lines.append(f"  ({CLIP_HINT})")
        if unexpected:
            lines.append(f"  {len(unexpected)} converted keys the model lacks: {listing(unexpected, 20)}")
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatches: {listing(mismatched, 20)}")
            if any("embed_tokens" in entry or "lm_head" in entry for entry in mismatched):
                lines.append("  (the vocabulary differs: build the model with the checkpoint's vocab_size, i.e. "
                             "the tokenizer of the release with its added [SEG] token)")
        raise ValueError("\n".join(lines))
    model.load_state_dict(converted, strict=True)
    return kept


# --- command line: weights only -----------------------------------------------------------------------------------

def load_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the `*.safetensors` files in a folder (or one file). Pickled `.bin` shards are refused."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if (path.is_file() and path.suffix != ".safetensors") or not files:
        bins = [path] if path.is_file() else sorted(path.glob("*.bin"))
        raise ValueError(
            f"no .safetensors weights at {path}"
            + (f" (found {listing(p.name for p in bins)}): pickled .bin files are never unpickled here; convert them "
               "to safetensors first in an environment you trust (e.g. load each shard with "
               "torch.load(weights_only=True) and write it with safetensors.torch.save_file)" if bins else ""))
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        shard = load_file(file, device="cpu")
        if clash := state_dict.keys() & shard.keys():
            raise ValueError(f"{file.name} repeats keys of another shard: {listing(clash)}")
        state_dict.update(shard)
    return state_dict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Rename a released READ checkpoint's weights to READForReasoningSegmentation's keys (weights only: "
                    "no config or tokenizer is written).")
    parser.add_argument("--checkpoint", required=True, help="folder of the release's *.safetensors shards")
    parser.add_argument("--vision-tower", help="folder or file of the base CLIP weights (*.safetensors), absent "
                                               "from releases: openai/clip-vit-large-patch14-336")
    parser.add_argument("--output", required=True, help="folder for the converted *.safetensors shards")
    args = parser.parse_args(argv)
    from huggingface_hub import save_torch_state_dict

    vision = load_safetensors_dir(args.vision_tower) if args.vision_tower else None
    converted = convert_read_state_dict(load_safetensors_dir(args.checkpoint), vision_tower_state_dict=vision)
    if vision is None:
        print(f"warning: no --vision-tower; {CLIP_HINT}", file=sys.stderr)
    # SamModel keeps the Fourier matrix twice (tied); safetensors refuses shared storage.
    tied = f"sam.{SAM_GAUSSIAN_TARGETS[1]}"
    if tied in converted:
        converted[tied] = converted[tied].clone()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(converted, args.output)
    print(f"wrote {len(converted)} tensors to {args.output}")


if __name__ == "__main__":
    main()
