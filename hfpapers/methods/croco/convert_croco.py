"""Convert a released CroCo / CroCo v2 checkpoint (github.com/naver/croco) to a `save_pretrained` folder of
`CroCoForPretraining`.

The releases are `torch.save`d envelopes `{"model": state_dict, "croco_kwargs": {...}}` (v2; the kwargs of the
official `CroCoNet`) or `{"model": state_dict}` with the default `CroCoNet` (v1). Keys map as

    patch_embed.* / enc_blocks.* / enc_norm.*      -> croco.*          (the encoder, `CroCoModel`)
    decoder_embed.* / dec_blocks.* / dec_norm.*    -> decoder.embed.* / decoder.blocks.* / decoder.norm.*
    mask_token / prediction_head.*                 -> unchanged

and the sin-cos tables v1 stores (`enc_pos_embed`, `dec_pos_embed`) are checked against ours and dropped (we compute
them for any grid). The weights are CC BY-NC-SA 4.0: the converted folder is for non-commercial use only.

    hfpapers convert croco CroCo_V2_ViTBase_SmallDecoder.pth OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ... import checkpoints
from .configuration_croco import CroCoConfig
from .modeling_croco import CroCoForPretraining, sincos_position_embedding

# official `CroCoNet` keyword -> our config field
KWARGS = {"img_size": "image_size", "patch_size": "patch_size", "mask_ratio": "mask_ratio",
          "enc_embed_dim": "hidden_size", "enc_depth": "num_hidden_layers", "enc_num_heads": "num_attention_heads",
          "dec_embed_dim": "decoder_hidden_size", "dec_depth": "decoder_num_hidden_layers",
          "dec_num_heads": "decoder_num_attention_heads", "mlp_ratio": "mlp_ratio",
          "norm_im2_in_dec": "norm_reference_in_decoder"}
PREFIXES = (("patch_embed.", "croco.patch_embed."), ("enc_blocks.", "croco.enc_blocks."),
            ("enc_norm.", "croco.enc_norm."), ("decoder_embed.", "decoder.embed."),
            ("dec_blocks.", "decoder.blocks."), ("dec_norm.", "decoder.norm."))
POSITION_TABLES = ("enc_pos_embed", "dec_pos_embed")


def config_from_kwargs(kwargs: Mapping) -> CroCoConfig:
    """Our config for the official `CroCoNet(**kwargs)` (its defaults where a keyword is absent)."""
    values = {}
    for key, value in kwargs.items():
        if key == "pos_embed":
            if value == "cosine":
                values["position_embedding"] = "cosine"
            elif isinstance(value, str) and value.startswith("RoPE"):
                values.update(position_embedding="rope", rope_base=float(value[len("RoPE"):]))
            else:
                raise ValueError(f"unknown official pos_embed {value!r}; expected 'cosine' or 'RoPE<base>'")
        elif key in KWARGS:
            values[KWARGS[key]] = value
        elif key != "norm_layer":
            raise ValueError(f"unknown CroCoNet argument {key!r} in croco_kwargs; known: {', '.join(KWARGS)}, "
                             "pos_embed")
    return CroCoConfig(**values)


def unwrap_checkpoint(obj) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, croco_kwargs) of a release envelope or of a bare state dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a CroCo checkpoint dict, got a {type(obj).__name__}")
    kwargs = dict(obj.get("croco_kwargs") or {})
    if isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"not a CroCo state dict (expected tensors, or a 'model' entry holding them); top-level "
                         f"keys: {checkpoints.listing(map(str, obj))}")
    return checkpoints.strip_wrapper_prefixes(obj), kwargs


def convert_state_dict(official: Mapping[str, torch.Tensor], config: CroCoConfig) -> dict[str, torch.Tensor]:
    """The official keys renamed to ours; the stored sin-cos tables must equal the ones we compute."""
    grid = config.image_size // config.patch_size
    converted = {}
    for key, tensor in official.items():
        if key in POSITION_TABLES and config.position_embedding == "cosine":
            width = config.hidden_size if key == "enc_pos_embed" else config.decoder_hidden_size
            expected = sincos_position_embedding(width, grid, grid)
            if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, atol=1e-6):
                raise ValueError(f"{key} {tuple(tensor.shape)} is not the {grid}x{grid} sin-cos table of width "
                                 f"{width} that this model computes")
            continue
        new = next((ours + key[len(theirs):] for theirs, ours in PREFIXES if key.startswith(theirs)), key)
        converted[new] = tensor
    return converted


def _hints(missing, unexpected, mismatched):
    if any("pos_embed" in key for key in unexpected):
        yield "sin-cos tables belong to CroCo v1 (pos_embed='cosine'); check croco_kwargs"
    if mismatched:
        yield "the shapes disagree with croco_kwargs (or the CroCoNet defaults when the checkpoint has none)"


def convert_checkpoint(checkpoint_path: str | Path, output_dir: str | Path | None = None) -> CroCoForPretraining:
    """The converted model (saved with its image processor into `output_dir` when given)."""
    # envelopes may hold the training `args` (a plain Namespace of strings and numbers)
    official, kwargs = unwrap_checkpoint(checkpoints.load_checkpoint(checkpoint_path,
                                                                     allowed_globals=[argparse.Namespace]))
    if not kwargs and "enc_pos_embed" in official:
        # v1 (no kwargs): the stored table's length tells the training resolution
        grid = math.isqrt(official["enc_pos_embed"].shape[0])
        kwargs = {"img_size": grid * official["patch_embed.proj.weight"].shape[-1]}
    config = config_from_kwargs(kwargs)
    model = CroCoForPretraining(config)
    checkpoints.load_state_dict_checked(model, convert_state_dict(official, config),
                                        f"{checkpoint_path} (CroCo, {config.position_embedding} positions)",
                                        hints=_hints)
    model.eval()
    if output_dir is not None:
        from .recipe import build_image_processor

        model.save_pretrained(output_dir)
        build_image_processor(config).save_pretrained(output_dir)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`hfpapers convert croco CHECKPOINT OUTPUT_DIR` takes no options: the architecture comes from the checkpoint's
    `croco_kwargs` (the `CroCoNet` defaults for v1)."""


def convert(checkpoint: str | Path, output_dir: str | Path) -> str:
    """`convert_checkpoint` for `hfpapers convert`: returns what was written."""
    model = convert_checkpoint(checkpoint, output_dir)
    c = model.config
    return (f"wrote CroCo ({c.position_embedding}, encoder {c.hidden_size}x{c.num_hidden_layers}, decoder "
            f"{c.decoder_hidden_size}x{c.decoder_num_hidden_layers}; {model.num_parameters():,} parameters) to "
            f"{output_dir} (weights: CC BY-NC-SA 4.0, non-commercial)")


def main(argv: list[str] | None = None) -> int:
    """`python -m hfpapers.methods.croco.convert_croco ...`: `hfpapers convert croco ...`."""
    from ...cli import main as cli_main

    return cli_main(["convert", "croco", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
