"""Official "Pooling And Attention" checkpoints -> an `LLMEmbeddingModel` folder.

The official training writes, per arm, a peft LoRA adapter folder (`adapter_config.json` + `adapter_model.*`,
keys `base_model.model.<decoder module>.lora_{A,B}.weight`) and, for Models 2-5, the pooler's state dict in
`attn_pool.pt` (the `PerceiverResampler`). With the base decoder (Mistral-7B-v0.1 in the paper):

    hfpapers convert llm-embedding ADAPTER_DIR OUT --base BASE --arm model-5

`attn_pool.pt` is read with `torch.load(weights_only=True)`; every key must map, or the conversion stops.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from ...checkpoints import listing, load_checkpoint, load_state_dict_checked
from . import ARMS

# Official PerceiverResampler key -> ours (under `pooler.`). The official PreNorm's `norm` normalises the LLM
# states (its `x`) and `norm_context` the latents; `to_q` reads the latents, `to_kv` the states.
POOLER_KEYS = {
    "latents": "latents",
    "pos_emb.weight": "layer_embedding.weight",
    "cross_attend_blocks.0.norm.weight": "cross_attention.norm_states.weight",
    "cross_attend_blocks.0.norm.bias": "cross_attention.norm_states.bias",
    "cross_attend_blocks.0.norm_context.weight": "cross_attention.norm_latents.weight",
    "cross_attend_blocks.0.norm_context.bias": "cross_attention.norm_latents.bias",
    "cross_attend_blocks.0.fn.to_q.weight": "cross_attention.to_q.weight",
    "cross_attend_blocks.0.fn.to_kv.weight": "cross_attention.to_kv.weight",
    "cross_attend_blocks.0.fn.to_out.weight": "cross_attention.to_out.weight",
    "cross_attend_blocks.1.norm.weight": "feed_forward.norm.weight",
    "cross_attend_blocks.1.norm.bias": "feed_forward.norm.bias",
    "cross_attend_blocks.1.fn.net.0.weight": "feed_forward.proj_in.weight",
    "cross_attend_blocks.1.fn.net.0.bias": "feed_forward.proj_in.bias",
    "cross_attend_blocks.1.fn.net.2.weight": "feed_forward.proj_out.weight",
    "cross_attend_blocks.1.fn.net.2.bias": "feed_forward.proj_out.bias",
}
_LORA_KEY = re.compile(r"^base_model\.model\.(?:model\.)?(.+)\.(lora_[AB])\.weight$")


def convert_pooler_state_dict(official: dict[str, torch.Tensor], num_layers: int | None) -> dict[str, torch.Tensor]:
    """The official pooler's state dict under our names. The official multi-layer pooler always allocates 32
    layer rows and uses the first `num_layers`; only those are kept (the outputs are the same)."""
    unknown = set(official) - set(POOLER_KEYS)
    if unknown:
        raise ValueError(f"attn_pool keys with no mapping: {listing(unknown)}")
    converted = {POOLER_KEYS[k]: v for k, v in official.items() if k != "pos_emb.weight"}
    if num_layers is not None:
        if "pos_emb.weight" not in official:
            raise ValueError("a multi-layer arm needs the official pooler's pos_emb.weight")
        converted["layer_embedding.weight"] = official["pos_emb.weight"][:num_layers]
    return converted


def convert_lora_state_dict(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft adapter keys (`base_model.model.layers.0.self_attn.q_proj.lora_A.weight`) -> our decoder's
    (`decoder.layers.0.self_attn.q_proj.lora_A.default.weight`)."""
    converted, unknown = {}, []
    for key, tensor in adapter.items():
        match = _LORA_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        converted[f"decoder.{match[1]}.{match[2]}.default.weight"] = tensor
    if unknown:
        raise ValueError(f"adapter keys that are not LoRA A/B weights: {listing(unknown)}")
    return converted


def _adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).exists():
            return load_checkpoint(adapter_dir / name)
    raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin")


def convert_adapter(adapter_dir: str | Path, output_dir: str | Path, base: str, arm: str, pooler: str | None = None,
                    **config_overrides):
    """Build the arm on `base`, load the official LoRA (and pooler), check that every weight was matched, save.
    Returns the model."""
    from transformers import AutoTokenizer

    from .modeling_llm_embedding import LLMEmbeddingModel

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
    adapter_path = Path(adapter_dir)
    lora = json.loads((adapter_path / "adapter_config.json").read_text())
    model = LLMEmbeddingModel.from_decoder(
        base, **ARMS[arm], lora_r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
        lora_target_modules=sorted(lora["target_modules"]), **config_overrides)
    state = convert_lora_state_dict(_adapter_weights(adapter_path))
    if model.pooler is not None:
        pooler_path = Path(pooler) if pooler else adapter_path / "attn_pool.pt"
        official = convert_pooler_state_dict(load_checkpoint(pooler_path), model.config.pooler_config.num_layers)
        state.update({f"pooler.{k}": v for k, v in official.items()})
    # The official files hold the adapters and the pooler; the base decoder keeps its own weights.
    trained = [k for k in model.state_dict() if "lora_" in k or k.startswith("pooler.")]
    load_state_dict_checked(model, state, f"the official {arm} checkpoint", expected_keys=trained)
    model.save_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_path if (adapter_path / "tokenizer_config.json").exists() else base)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(output_dir)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hfpapers convert llm-embedding ADAPTER_DIR OUTPUT_DIR` (ADAPTER_DIR: the official output
    folder, adapter_config.json + adapter_model.*)."""
    parser.add_argument("--base", required=True, help="the base decoder (Hub id or folder), e.g. Mistral-7B-v0.1")
    parser.add_argument("--arm", required=True, choices=list(ARMS))
    parser.add_argument("--pooler", help="the pooler file (default: ADAPTER_DIR/attn_pool.pt)")


def convert(checkpoint: str | Path, output_dir: str | Path, base: str, arm: str, pooler: str | None = None) -> str:
    """`convert_adapter` for `hfpapers convert`: returns what was written."""
    model = convert_adapter(checkpoint, output_dir, base, arm, pooler)
    return f"saved {arm} on {base} ({model.num_parameters():,} parameters) to {output_dir}"


def main(argv: list[str] | None = None) -> int:
    """`python -m hfpapers.methods.llm_embedding.convert_llm_embedding ...`: `hfpapers convert llm-embedding ...`."""
    from ...cli import main as cli_main

    return cli_main(["convert", "llm-embedding", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
