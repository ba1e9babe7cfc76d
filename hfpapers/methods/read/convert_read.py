"""Convert a released READ checkpoint (github.com/rui-qian/READ; LISA and SESAME checkpoints share the layout) into a
folder of `READForReasoningSegmentation` (children `llava`, `sam`, `text_hidden_fcs`) and its `READProcessor`:

    hfpapers convert read READ-LLaVA-v1.5-7B-for-ReasonSeg-valset read-7b --vision-tower clip-vit-large-patch14-336

What the released folders hold. `merge_lora_weights_and_save_hf_model.py` merges the LoRA, then saves
`READForCausalLM.state_dict()` with `save_pretrained` (transformers 4.31, bf16), *leaving out every key that contains
"vision_tower"*, and the tokenizer (`init_READ_model`: Vicuna's LlamaTokenizer, legacy=True, then
`add_tokens("[SEG]")` = 32000 and `<im_start>`/`<im_end>` = 32001/32002). So a release has a Llama-style config.json
(LlavaLlamaForCausalLM: vocab_size 32003, mm_vision_tower, mm_projector_type mlp2x_gelu, mm_use_im_start_end,
out_dim, ...), the tokenizer files and

    model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight     the Llama LM (Vicuna)
    model.mm_projector.{0,2}.{weight,bias}                                             LLaVA-1.5's 2-layer MLP
    model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*                   SAM ViT-H, official names
    model.text_hidden_fcs.0.{0,2}.{weight,bias}                                        the [SEG] projection

but not the CLIP tower, which the official code loads from `--vision_tower` (openai/clip-vit-large-patch14-336,
frozen, never trained), with its CLIPImageProcessor. Pass that folder as the vision tower. Weights are read from
safetensors only: pickled `.bin` files are refused, never unpickled.

Weights: only renaming is needed: every official SAM tensor has the shape of its transformers `SamModel` counterpart
(checked by `tests/test_convert_read.py` and by a parity run of the official modules against `SamModel`). The one
official tensor that feeds two of ours is SAM's random-Fourier matrix, which `SamModel` keeps twice (tied).

Vocabulary: the release's ids stay; one `<image>` placeholder is appended (id = the release's vocab_size), which
transformers' LLaVA expands to one token per image patch where the official code splits the prompt on "<image>"
(`tokenizer_image_token`). Its embedding and LM-head rows are the mean rows; LLaVA never reads its embedding.

Prompt and tokens: the chat template writes the official LLaVA v1 prompt ("{system} USER: <im_start><image><im_end>\n
{question} ASSISTANT:"), and the tokenizer is set up so that its ids equal those of the official transformers-4.31
tokenizer (`load_release_tokenizer`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ...checkpoints import check_state_dict, listing, load_state_dict_checked, strip_wrapper_prefixes

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


def _fit_hints(missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    """What a READ release's usual misfits mean (for `hfpapers.checkpoints.check_state_dict`)."""
    hints = [CLIP_HINT] if any(key.startswith(CLIP_TOWER) for key in missing) else []
    if any("embed_tokens" in entry or "lm_head" in entry for entry in mismatched):
        hints.append("The vocabulary differs: build the model with the checkpoint's vocab_size, i.e. the tokenizer "
                     "of the release with its added [SEG] token")
    return hints


def load_converted(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                   vision_tower_state_dict: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Convert a released READ checkpoint and load it strictly into `model` (children `llava`, `sam`,
    `text_hidden_fcs`). Raises one ValueError listing the model keys nothing filled, the converted keys the model
    lacks and the shape mismatches. Returns the adapter (LoRA) keys left as the model had them."""
    converted = convert_read_state_dict(state_dict, vision_tower_state_dict=vision_tower_state_dict)
    target = model.state_dict()
    converted, kept = _fit_to_adapters(converted, model, target)
    load_state_dict_checked(model, converted, "the converted READ checkpoint", hints=_fit_hints)
    return kept


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


# --- a whole release folder -> a loadable READ folder --------------------------------------------------------------

IMAGE_TOKEN = "<image>"  # official DEFAULT_IMAGE_TOKEN (model/llava/constants.py)
IM_START_TOKEN, IM_END_TOKEN = "<im_start>", "<im_end>"
SEG_TOKEN = "[SEG]"

# The system prompts of the official LLaVA v1 conversations (model/llava/conversation.py: conv_llava_v1, and
# conv_vicuna_v1, the module's `default_conversation`). train_read.py sets `default_conversation` to --conv_type
# (default "llava_v1") before training and before the ReasonSeg evaluation (val_read.sh: train_read.py --eval_only);
# test_read.py and demo.py never set it, so their prompts carry conv_vicuna_v1's system prompt.
SYSTEM_PROMPTS = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.",
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.",
}
# The text config fields of a LLaVA-Llama config.json that LlamaConfig takes as they are.
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "hidden_act", "max_position_embeddings", "rms_norm_eps", "initializer_range", "attention_bias",
                "bos_token_id", "eos_token_id", "pad_token_id")
EXPECTED_FOLDER = ("a released READ/LISA folder as merge_lora_weights_and_save_hf_model.py writes it: config.json "
                   "(LlavaLlamaForCausalLM), the tokenizer files and *.safetensors weights")
TOKENIZER_HINT = ("a release keeps its tokenizer as the sentencepiece tokenizer.model of Vicuna with [SEG], "
                  "<im_start>, <im_end> added (added_tokens.json); transformers reads it with the sentencepiece and "
                  "protobuf packages")


def official_prompt(question: str, conversation: str = "llava_v1", use_im_start_end: bool = True) -> str:
    """The prompt text of the official code for one image and one question, up to the assistant's turn.

    `conv.append_message(USER, DEFAULT_IMAGE_TOKEN + "\\n" + question)`, `conv.append_message(ASSISTANT, None)` and
    `conv.get_prompt()` (SeparatorStyle.TWO, sep " ": system, then "USER: " + message + " ", then "ASSISTANT:"),
    then `replace_image_tokens` (dataloaders/utils.py) when the config has mm_use_im_start_end."""
    prompt = f"{SYSTEM_PROMPTS[conversation]} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"
    if use_im_start_end:
        prompt = prompt.replace(IMAGE_TOKEN, IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN)
    return prompt


def official_chat_template(conversation: str = "llava_v1", use_im_start_end: bool = True) -> str:
    """A chat template that renders what `official_prompt` (and, with answers, the official training prompt
    "... ASSISTANT: {answer}</s>") writes. A leading system message replaces the default system prompt."""
    image = (IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN if use_im_start_end else IMAGE_TOKEN) + "\n"
    return (
        "{%- set system = " + json.dumps(SYSTEM_PROMPTS[conversation]) + " -%}"
        "{%- set turns = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
        "else messages[0]['content'][0]['text'] -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- endif -%}"
        "{{- system + ' ' -}}"
        "{%- for message in turns -%}"
        "{{- ('USER' if message['role'] == 'user' else 'ASSISTANT') + ': ' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- " + json.dumps(image) + " -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- ' ' if message['role'] == 'user' else '</s>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def read_release_config(checkpoint_dir: str | Path) -> dict:
    """The release's config.json (LlavaLlamaForCausalLM fields plus READ's out_dim, mm_use_im_start_end, ...)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json in {checkpoint_dir}: expected {EXPECTED_FOLDER}")
    official = json.loads(path.read_text())
    if missing := [key for key in ("vocab_size", "hidden_size", "num_hidden_layers") if key not in official]:
        raise ValueError(f"{path} lacks {missing}: not the config of a LLaVA-Llama model ({EXPECTED_FOLDER})")
    return official


def load_release_tokenizer(checkpoint_dir: str | Path, use_im_start_end: bool = True):
    """The release's tokenizer, made to tokenize as the official one (transformers 4.31, slow LlamaTokenizer) did,
    plus an `<image>` placeholder appended at the end of the vocabulary (transformers' LLaVA expands it to one
    token per image patch; the official code splits the prompt on "<image>" instead, `tokenizer_image_token`).

    transformers 4.31 strips the whitespace on both sides of a token added with `add_tokens` ([SEG], <im_start>,
    <im_end>: "USER: <im_start>" reads "USER:" <im_start>, "<im_end>\\nWhat" reads <im_end> "What"), and its
    `legacy=True` Llama tokenizer (init_READ_model passes it) starts every piece between added tokens with "▁"; the
    added tokens here strip both sides (lstrip/rstrip) and `legacy` is kept so that it is saved. Padding: the unknown
    token, on the left (official load_pretrained_model_READ and test_read.py)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    settings_file = checkpoint_dir / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    # transformers 4.31 reads a missing or null flag as legacy, transformers 5 as not legacy.
    legacy = settings.get("legacy")
    legacy = True if legacy is None else bool(legacy)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, legacy=legacy)
    except (OSError, ValueError, ImportError, TypeError) as error:
        raise ValueError(f"could not read the tokenizer in {checkpoint_dir} ({type(error).__name__}: {error}); "
                         f"{TOKENIZER_HINT}") from error
    vocab = tokenizer.get_vocab()
    needed = [SEG_TOKEN] + ([IM_START_TOKEN, IM_END_TOKEN] if use_im_start_end else [])
    if missing := [token for token in needed if token not in vocab]:
        raise ValueError(f"the tokenizer in {checkpoint_dir} lacks {missing}: not the tokenizer of a READ/LISA "
                         f"release ({TOKENIZER_HINT})")
    if IMAGE_TOKEN in vocab:
        raise ValueError(f"the tokenizer in {checkpoint_dir} already has {IMAGE_TOKEN!r} (id {vocab[IMAGE_TOKEN]}); "
                         "a READ/LISA release does not (the official code never tokenizes it)")
    for token in needed:
        special = token != SEG_TOKEN  # [SEG] is a plain added token officially, kept by skip_special_tokens
        tokenizer.add_tokens([AddedToken(token, lstrip=True, rstrip=True, normalized=False, special=special)],
                             special_tokens=special)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    # transformers 5 saves these only when they are init kwargs
    tokenizer.init_kwargs["padding_side"] = "left"
    if hasattr(tokenizer, "legacy"):
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    return tokenizer


def load_vision_tower_config(vision_tower_dir: str | Path):
    """The CLIPVisionConfig of a CLIPVisionModel or CLIPModel folder."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(vision_tower_dir)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not read the vision tower's config.json in {vision_tower_dir} ({error}); "
                         f"{CLIP_HINT}") from error
    vision = getattr(config, "vision_config", config)
    if vision.model_type != "clip_vision_model":
        raise ValueError(f"{vision_tower_dir} holds a {config.model_type!r} model, not a CLIP (vision) model; "
                         f"{CLIP_HINT}")
    return vision


def build_read_processor(checkpoint_dir: str | Path, vision_tower_dir: str | Path, *, sam_image_size: int = 1024,
                         conversation: str = "llava_v1"):
    """READProcessor for a release: its tokenizer (`load_release_tokenizer`), the vision tower's CLIP image
    processor (PIL backend, as the official transformers 4.31 CLIPImageProcessor: shortest side resized, centre
    crop, CLIP normalisation; applied as it is, `image_aspect_ratio` "square", by dataloaders/base_dataset.py),
    SAM's processor at `sam_image_size` and the official conversation as chat template."""
    from transformers import AutoImageProcessor

    from .processing_read import READProcessor
    from .recipe import sam_image_processor

    if conversation not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown conversation {conversation!r}; one of {sorted(SYSTEM_PROMPTS)}")
    official = read_release_config(checkpoint_dir)
    use_im_start_end = bool(official.get("mm_use_im_start_end", False))
    vision = load_vision_tower_config(vision_tower_dir)
    try:
        image_processor = AutoImageProcessor.from_pretrained(vision_tower_dir, backend="pil")
    except (OSError, ValueError) as error:
        raise ValueError(f"no CLIP image processor (preprocessor_config.json) in {vision_tower_dir} ({error}); "
                         f"{CLIP_HINT}") from error
    crop = getattr(image_processor, "crop_size", None) or {}
    if (crop.get("height"), crop.get("width")) != (vision.image_size, vision.image_size):
        raise ValueError(f"the image processor of {vision_tower_dir} crops to {crop}, but its CLIP reads "
                         f"{vision.image_size}x{vision.image_size} images")
    return READProcessor(image_processor, load_release_tokenizer(checkpoint_dir, use_im_start_end),
                         sam_image_processor(sam_image_size),
                         chat_template=official_chat_template(conversation, use_im_start_end),
                         image_seq_length=(vision.image_size // vision.patch_size) ** 2, image_token=IMAGE_TOKEN)


def llava_config_from_release(official: Mapping, vision_config, vocab_size: int, image_token_index: int):
    """transformers' LlavaConfig for a release's LlavaLlamaForCausalLM config: LLaVA-1.5's 2-layer GELU projector,
    features of CLIP layer `mm_vision_select_layer` without the class token (`mm_vision_select_feature` "patch")."""
    from transformers import LlamaConfig, LlavaConfig

    projector = official.get("mm_projector_type", "linear")  # LLaVA's builder defaults to a linear projector
    if projector != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {projector!r} is not supported: transformers' LLaVA projector is "
                         "LLaVA-1.5's mlp2x_gelu")
    select = official.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise ValueError(f"mm_vision_select_feature {select!r} is not supported (READ uses 'patch')")
    if official.get("rope_scaling"):
        raise ValueError(f"rope_scaling {official['rope_scaling']} is not supported (Vicuna v1.5 has none)")
    mm_hidden = official.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision_config.hidden_size:
        raise ValueError(f"the release's projector reads {mm_hidden}-d features, the vision tower gives "
                         f"{vision_config.hidden_size}-d: not the CLIP it was trained with "
                         f"(mm_vision_tower {official.get('mm_vision_tower')!r})")
    text = {key: official[key] for key in LLAMA_FIELDS if official.get(key) is not None}
    if official.get("rope_theta") is not None:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": official["rope_theta"]}
    text_config = LlamaConfig(**text, vocab_size=vocab_size, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
                       image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                       projector_hidden_act="gelu", vision_feature_layer=official.get("mm_vision_select_layer", -2),
                       vision_feature_select_strategy="default", multimodal_projector_bias=True,
                       tie_word_embeddings=False)


def sam_vit_h_config():
    """SAM ViT-H (sam_vit_h_4b8939.pth, the official `build_sam_vit_h`) as a SamConfig: the presets' SAM."""
    import copy

    from transformers import SamConfig

    from . import _SAM_VIT_H

    return SamConfig(**copy.deepcopy(_SAM_VIT_H))


def read_settings(official: Mapping) -> dict:
    """SasP settings for a release: none for LISA/SESAME (no SasP); the official code's 13B setting for 13B models
    (model/READ.py, the commented "READ-13B ReasonSeg test set" lines), its 7B setting otherwise."""
    from . import RECORD

    if any(str(name).startswith(("LISA", "SESAME")) for name in official.get("architectures") or []):
        return {"use_sasp": False}
    preset = RECORD.presets["read-13b" if official.get("hidden_size") == 5120 else "read-7b"]
    preset = getattr(preset, "config", preset)  # a registry `Preset` or its plain config mapping
    return {key: preset[key] for key in ("num_points", "down_sample", "t_pos", "t_neg") if key in preset}


def convert_read_checkpoint(checkpoint_dir: str | Path, vision_tower_dir: str | Path, sam_config=None,
                            output_dir: str | Path | None = None, *, conversation: str = "llava_v1",
                            dtype: torch.dtype | str | None = None, **config_kwargs):
    """A released READ/LISA folder (config.json, tokenizer, *.safetensors) and the CLIP it was trained with
    (`vision_tower_dir`: a CLIPVisionModel/CLIPModel folder with safetensors weights and its image processor, e.g.
    openai/clip-vit-large-patch14-336) -> `READForReasoningSegmentation`, saved with its `READProcessor` into
    `output_dir` when given.

    The vocabulary keeps the release's ids ([SEG], <im_start>, <im_end>) and appends `<image>` at id = the release's
    vocab_size; its rows of the token embeddings and the LM head are the mean rows (never read: LLaVA puts image
    features where `<image>` stands). `sam_config`: SAM ViT-H unless given. `dtype`: the release's (bf16) unless
    given. `config_kwargs` go to READConfig (e.g. use_sasp, num_points, down_sample, t_pos)."""
    from ...registry import register_with_transformers
    from .configuration_read import READConfig
    from .modeling_read import READForReasoningSegmentation

    register_with_transformers()
    if config_kwargs.get("lora_r"):
        raise ValueError("a release's LoRA is merged into its weights: convert with lora_r=0 (the default)")
    checkpoint_dir, vision_tower_dir = Path(checkpoint_dir), Path(vision_tower_dir)
    official = read_release_config(checkpoint_dir)
    state_dict = load_safetensors_dir(checkpoint_dir)
    vision_state_dict = load_safetensors_dir(vision_tower_dir)
    if sam_config is None:
        sam_config = sam_vit_h_config()
    elif isinstance(sam_config, Mapping):
        from transformers import SamConfig

        sam_config = SamConfig(**sam_config)
    processor = build_read_processor(checkpoint_dir, vision_tower_dir, conversation=conversation,
                                     sam_image_size=sam_config.vision_config.image_size)
    tokenizer = processor.tokenizer

    vocab_size = official["vocab_size"]
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    seg_token_index = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    if image_token_index != vocab_size or len(tokenizer) != vocab_size + 1:
        raise ValueError(f"the tokenizer has {len(tokenizer) - 1} tokens but the config's vocab_size is {vocab_size}: "
                         "the tokenizer and the weights are not of one release")

    converted = convert_read_state_dict(state_dict, vision_tower_state_dict=vision_state_dict)
    rows = {key: tuple(converted[key].shape) for key in VOCAB_KEYS if key in converted}
    if any(shape[0] != vocab_size for shape in rows.values()):
        raise ValueError(f"the config's vocab_size is {vocab_size} but the weights have {rows}")
    converted = remap_vocabulary(converted, vocab_size + 1)
    if dtype is None or dtype == "auto":  # the release's (its LM's) dtype
        dtype = converted.get(VOCAB_KEYS[0], next(iter(converted.values()))).dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    converted = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor
                 for key, tensor in converted.items()}

    vision_config = load_vision_tower_config(vision_tower_dir)
    llava_config = llava_config_from_release(official, vision_config, vocab_size + 1, image_token_index)
    settings = {**read_settings(official), **config_kwargs, "lora_r": 0}
    config = READConfig(llava_config=llava_config.to_dict(), sam_config=sam_config.to_dict(),
                        seg_token_index=seg_token_index, out_dim=official.get("out_dim"), **settings)
    config.validate_read()
    with torch.device("meta"):
        target = READForReasoningSegmentation(config).state_dict()
    check_state_dict(converted, target, "the converted READ checkpoint", hints=_fit_hints)
    model = READForReasoningSegmentation.from_pretrained(None, config=config, state_dict=converted, dtype=dtype)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hfpapers convert read CHECKPOINT_DIR OUTPUT_DIR` (CHECKPOINT_DIR: the release's folder as
    merge_lora_weights_and_save_hf_model.py writes it: config.json, tokenizer, *.safetensors)."""
    parser.add_argument("--vision-tower", required=True,
                        help="the CLIP it was trained with, absent from releases (a CLIPVisionModel/CLIPModel folder "
                             "with *.safetensors and preprocessor_config.json: openai/clip-vit-large-patch14-336)")
    parser.add_argument("--sam-config", help="a SamModel folder or config.json for SAM's config (default: SAM ViT-H, "
                                             "the official sam_vit_h_4b8939.pth)")
    parser.add_argument("--conversation", choices=sorted(SYSTEM_PROMPTS), default="llava_v1",
                        help="system prompt of the chat template: llava_v1 (training and the ReasonSeg evaluation, "
                             "train_read.py) or vicuna_v1 (test_read.py and demo.py)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weights' dtype (auto: the release's)")
    parser.add_argument("--lisa", action="store_true", help="no Similarity-as-Points (LISA); automatic for "
                                                            "LISA/SESAME configs")
    parser.add_argument("--num-points", type=int)
    parser.add_argument("--down-sample", type=int)
    parser.add_argument("--t-pos", type=float)
    parser.add_argument("--t-neg", type=float)


def convert(checkpoint: str | Path, output_dir: str | Path, vision_tower: str | Path, sam_config: str | None = None,
            conversation: str = "llava_v1", dtype: str = "auto", lisa: bool = False, **settings) -> str:
    """`convert_read_checkpoint` for `hfpapers convert` (`sam_config`: a SamModel folder or config.json path;
    `settings`: num_points, down_sample, t_pos, t_neg, None for the release's): returns what was written."""
    overrides = {name: value for name, value in settings.items() if value is not None}
    if lisa:
        overrides["use_sasp"] = False
    if sam_config is not None:
        from transformers import SamConfig

        sam_config = SamConfig.from_pretrained(sam_config)
    model = convert_read_checkpoint(checkpoint, vision_tower, sam_config, output_dir=output_dir,
                                    conversation=conversation, dtype=dtype, **overrides)
    config = model.config
    return (f"wrote {output_dir}: [SEG] = {config.seg_token_index}, <image> = "
            f"{config.llava_config.image_token_index}, use_sasp = {config.use_sasp}, dtype = {model.dtype}")


def main(argv: list[str] | None = None) -> int:
    """`python -m hfpapers.methods.read.convert_read ...`: `hfpapers convert read ...`."""
    from ...cli import main as cli_main

    return cli_main(["convert", "read", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
