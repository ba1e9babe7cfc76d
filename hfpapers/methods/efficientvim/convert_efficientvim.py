"""Convert an official EfficientViM checkpoint (github.com/mlvlab/EfficientViM) or a timm one to a `save_pretrained`
folder.

The official training script saves an envelope `{"model", "model_ema", "optimizer", ..., "config"}` whose
`"config"` is a yacs `CfgNode`; timm and the Hub hold the bare state dict, with the same key names and shapes
(timm only drops the distillation head of non-distilled models). Our module names follow the official ones, so
the conversion puts the body (`patch_embed.*`, `stages.*`) under `efficientvim.`, keeps the fusion head
(`weights`, `norm.*`, `heads.*`, and `weights_dist`, `heads_dist.*` when distilled) as it is, and accepts the
LayerNorm parameters flattened to (C,). The rest here tells the variant from the weights.

    hfpapers convert efficientvim CHECKPOINT OUTPUT_DIR [--variant M1] \
        [--image-size 224] [--drop-distillation-head]

ImageNet-1k class names are not available offline: the converted config keeps the default labels LABEL_0...
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from ... import checkpoints
from ...registry import create_processor, get_method
from .configuration_efficientvim import EfficientViMConfig
from .modeling_efficientvim import EfficientViMForImageClassification

# The official envelope keeps the raw and the EMA weights; timm's filter prefers the EMA ones (they match the
# paper's top-1), and so do we.
ENVELOPE_KEYS = ("model_ema", "model", "state_dict")
BASE_PREFIX = "efficientvim."
DISTILLATION_KEYS = re.compile(r"^(heads_dist\.|weights_dist$)")
# The channel LayerNorms, (1, C, 1) or (1, C, 1, 1) officially; flattened to (C,) by some re-exports.
LAYER_NORM_KEYS = re.compile(r"^(stages\.\d+\.blocks\.\d+\.norm|norm\.\d+)\.(weight|bias)$")
ARCHITECTURE_FIELDS = ("num_channels", "embed_dim", "depths", "state_dim", "mlp_ratio", "num_labels")


def unwrap_checkpoint(obj) -> dict[str, torch.Tensor]:
    """The state dict inside `obj`: a state dict itself, or an envelope holding one under `model_ema` (preferred),
    `model` or `state_dict`. Wrapper prefixes (`module.`, `_orig_mod.`) are removed."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, got a {type(obj).__name__}")
    if obj and not all(isinstance(value, torch.Tensor) for value in obj.values()):
        key = next((k for k in ENVELOPE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ValueError(
                f"not a state dict, and no state dict under {', '.join(map(repr, ENVELOPE_KEYS))}; "
                f"top-level keys: {checkpoints.listing(map(str, obj))}"
            )
        obj = obj[key]
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    return checkpoints.strip_wrapper_prefixes(obj)


def _dim(key: str, axis: int, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Size `axis` of `state_dict[key]`, with an error naming the key when it is absent or has too few dims."""
    if key not in state_dict:
        raise ValueError(f"not an EfficientViM classifier state dict: no {key!r} (keys: {checkpoints.listing(state_dict)})")
    if state_dict[key].dim() <= axis:
        raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, expected at least {axis + 1} dims")
    return state_dict[key].shape[axis]


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The config fields that the weights determine, read off an official (prefix-free) state dict's shapes."""
    blocks = {}
    for key in state_dict:
        if match := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key):
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    if sorted(blocks) != [0, 1, 2]:
        raise ValueError(f"expected blocks in stages 0, 1 and 2, found them in stages {sorted(blocks)}")
    embed_dim = [_dim(f"stages.{s}.blocks.0.alpha", 1, state_dict) for s in range(3)]
    return {
        "num_channels": _dim("patch_embed.conv.0.conv.weight", 1, state_dict),
        "embed_dim": embed_dim,
        "depths": [max(blocks[s]) + 1 for s in range(3)],
        "state_dim": [_dim(f"stages.{s}.blocks.0.mixer.A", 0, state_dict) for s in range(3)],
        "mlp_ratio": _dim("stages.0.blocks.0.ffn.fc1.conv.weight", 0, state_dict) / embed_dim[0],
        "num_labels": _dim("heads.0.weight", 0, state_dict),
        "distillation": any(DISTILLATION_KEYS.match(key) for key in state_dict),
    }


def _matching_preset(architecture: Mapping) -> str | None:
    """The paper preset with these widths, depths and state sizes (heads aside), if any."""
    record = get_method("efficientvim")
    for name in record.paper_presets:
        preset = record.preset(name)
        if all(list(preset[k]) == list(architecture[k]) for k in ("embed_dim", "depths", "state_dim")):
            return name
    return None


def config_from_state_dict(state_dict, image_size: int | None = None) -> EfficientViMConfig:
    """Our config for an official / timm state dict (or checkpoint envelope).

    `image_size` (the image processor's crop) defaults to the paper's for the matching preset: 256 for M4,
    224 otherwise."""
    architecture = infer_architecture(unwrap_checkpoint(state_dict))
    if image_size is None:
        preset = _matching_preset(architecture)
        image_size = get_method("efficientvim").preset(preset)["image_size"] if preset else 224
    return EfficientViMConfig(image_size=image_size, **architecture)


def _architecture_mismatch(state_dict: Mapping[str, torch.Tensor], config: EfficientViMConfig) -> str | None:
    """A message when the weights are those of another variant (or head) than `config`; None when they match or
    are too incomplete to tell (the key listing then says what is wrong)."""
    try:
        found = infer_architecture(state_dict)
    except ValueError:
        return None
    differences = []
    for field in ARCHITECTURE_FIELDS:
        expected = getattr(config, field)
        expected = list(expected) if isinstance(expected, (list, tuple)) else expected
        if found[field] != expected:
            differences.append(f"checkpoint has {field} {found[field]}, config expects {expected}")
    if not differences:
        return None
    preset = _matching_preset(found)
    hint = f" (the checkpoint's body matches preset {preset!r})" if preset else ""
    return f"the checkpoint looks like a different variant than the config: {'; '.join(differences)}{hint}"


def convert_state_dict(state_dict, config: EfficientViMConfig,
                       drop_distillation_head: bool = False) -> dict[str, torch.Tensor]:
    """Map an official / timm state dict (or checkpoint envelope) to the keys of our
    `EfficientViMForImageClassification` for `config`.

    A distillation head in the checkpoint of a non-distilled config is an error unless `drop_distillation_head`
    (what timm does when it loads a `-dist` checkpoint into a plain model). Missing `num_batches_tracked` are
    filled with 0. Keys and shapes are checked when the result loads
    (`hfpapers.checkpoints.load_state_dict_checked`)."""
    state_dict = unwrap_checkpoint(state_dict)
    has_distillation = any(DISTILLATION_KEYS.match(key) for key in state_dict)
    if has_distillation and not config.distillation:
        if not drop_distillation_head:
            raise ValueError(
                "the checkpoint has a distillation head (heads_dist.*, weights_dist) but the config has "
                "distillation=False: use a distilled config (e.g. variant M1-dist), or drop the head explicitly "
                "(drop_distillation_head=True, --drop-distillation-head) as timm does"
            )
        state_dict = {k: v for k, v in state_dict.items() if not DISTILLATION_KEYS.match(k)}
    elif config.distillation and not has_distillation:
        raise ValueError(
            "the config has distillation=True but the checkpoint has no distillation head (heads_dist.*, "
            "weights_dist): use the non-distilled variant (e.g. M1 rather than M1-dist)"
        )
    if message := _architecture_mismatch(state_dict, config):
        raise ValueError(message)

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        reference = EfficientViMForImageClassification(config).state_dict()
    expected = {key.removeprefix(BASE_PREFIX): (key, tuple(t.shape)) for key, t in reference.items()}
    converted = {}
    for key, tensor in state_dict.items():
        ours, shape = expected.get(key, (key, None))  # an unknown key keeps its name, for the loader's listing
        if LAYER_NORM_KEYS.match(key) and shape and tensor.dim() == 1 and tensor.numel() == shape[1]:
            tensor = tensor.reshape(shape)
        converted[ours] = tensor
    for key, (ours, _) in expected.items():
        if key.endswith(".num_batches_tracked") and key not in state_dict:  # a training counter; inference skips it
            converted[ours] = torch.tensor(0, dtype=torch.long)
    return converted


def load_checkpoint(path: str | Path):
    """Read a checkpoint file (see `hfpapers.checkpoints.load_checkpoint`).

    The official envelopes hold their yacs `CfgNode` config, which weights-only unpickling refuses. We allow that
    one global and build it as an OrderedDict: torch's restricted unpickler fills only exact dict / OrderedDict /
    Counter instances (SETITEMS), so an allow-listed dict subclass would still be refused. No code runs."""
    return checkpoints.load_checkpoint(path, allowed_globals=[(OrderedDict, "yacs.config.CfgNode")])


def convert_checkpoint(path: str | Path, output_dir: str | Path, variant: str | None = None,
                       image_size: int | None = None,
                       drop_distillation_head: bool = False) -> EfficientViMForImageClassification:
    """Convert the checkpoint at `path` into `output_dir` (model as safetensors, config, image processor).

    `variant` (a preset such as "M1" or "M1-dist") fixes the config and is checked against the weights; without
    it the config is inferred from them. Returns the converted model, in eval mode."""
    state_dict = unwrap_checkpoint(load_checkpoint(path))
    if variant is not None:
        try:
            preset = get_method("efficientvim").preset(variant)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        if image_size is not None:
            preset["image_size"] = image_size
        config = EfficientViMConfig(**preset)
    else:
        config = config_from_state_dict(state_dict, image_size)
        if drop_distillation_head:
            config.distillation = False
    model = EfficientViMForImageClassification(config)
    checkpoints.load_state_dict_checked(model, convert_state_dict(state_dict, config, drop_distillation_head),
                                        "the checkpoint")
    model.eval()
    model.save_pretrained(output_dir)
    create_processor("efficientvim", config).save_pretrained(output_dir)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hfpapers convert efficientvim CHECKPOINT OUTPUT_DIR` (CHECKPOINT: an official .pth envelope,
    a timm state dict, or .safetensors)."""
    parser.add_argument("--variant", help="preset to convert to (M1..M4, M1-dist..M4-dist), checked against the "
                                          "weights; default: inferred from them")
    parser.add_argument("--image-size", type=int, help="the image processor's crop (default 224, 256 for M4)")
    parser.add_argument("--drop-distillation-head", action="store_true",
                        help="convert a distilled checkpoint to a plain model, dropping heads_dist and weights_dist")


def convert(checkpoint: str | Path, output_dir: str | Path, variant: str | None = None, image_size: int | None = None,
            drop_distillation_head: bool = False) -> str:
    """`convert_checkpoint` for `hfpapers convert`: returns what was written."""
    model = convert_checkpoint(checkpoint, output_dir, variant, image_size, drop_distillation_head)
    c = model.config
    return (f"wrote EfficientViM embed_dim {list(c.embed_dim)}, depths {list(c.depths)}, state_dim "
            f"{list(c.state_dim)}{' with distillation head' if c.distillation else ''}, {c.num_labels} classes, "
            f"{c.image_size} px ({model.num_parameters():,} parameters) to {output_dir}; class names are the "
            "defaults LABEL_<i> (set config.id2label for ImageNet names)")


def main(argv: list[str] | None = None) -> int:
    """`python -m hfpapers.methods.efficientvim.convert_efficientvim ...`: `hfpapers convert efficientvim ...`."""
    from ...cli import main as cli_main

    return cli_main(["convert", "efficientvim", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
