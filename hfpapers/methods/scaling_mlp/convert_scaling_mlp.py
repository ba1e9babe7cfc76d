"""Convert an official Scaling MLPs checkpoint (github.com/gregorbachmann/scaling_mlps) to a `save_pretrained` folder.

The official code saves `torch.save(model.state_dict(), path)`: a raw state dict of its `BottleneckMLP` (keys
`linear_in.*`, `blocks.{i}.block.{0,2}.*`, `layernorms.{i}.*`, `linear_out.*`), with the training arguments as
JSON (`config.txt`, or `<name>_config` for the released files) next to it. Our body lives under `mlp.`, so the
conversion is a renaming; the rest here reads the architecture off the weights and checks it against the name and
JSON.

    hfpapers convert scaling-mlp CHECKPOINT OUTPUT_DIR --model-name B_12-Wi_1024 \
        [--config config.txt] [--dataset cifar10|cifar100|imagenet|imagenet21]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ... import checkpoints
from .configuration_scaling_mlp import ScalingMLPConfig
from .image_processing_scaling_mlp import build_image_processor
from .modeling_scaling_mlp import ScalingMLPForImageClassification

# Normalisation of the official data pipeline (data_utils/data_stats.py). It lists these times 255 and normalises
# un-rescaled [0, 255] pixels, which equals normalising [0, 1] pixels (what our image processor does) with these.
DATASET_MEAN_STD = {
    "imagenet21": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
}
DATASET_NUM_CLASSES = {"imagenet21": 11230, "imagenet": 1000, "cifar10": 10, "cifar100": 100}


MODEL_NAME = re.compile(r"B_(?P<num_blocks>\d+)-Wi_(?P<hidden_size>\d+)(?:-E_(?P<expansion>\d+))?")


def parse_model_name(name: str) -> dict[str, int]:
    """`B_12-Wi_1024` or `B_12-Wi_1024-E_8` -> num_blocks, hidden_size, expansion (4 when `-E_` is absent)."""
    match = MODEL_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"model name {name!r} is not of the form B_<blocks>-Wi_<width>[-E_<expansion>]")
    return {
        "num_blocks": int(match["num_blocks"]),
        "hidden_size": int(match["hidden_size"]),
        "expansion": int(match["expansion"] or 4),
    }


def config_from_official(
    num_blocks: int,
    hidden_size: int,
    num_classes: int,
    resolution: int = 64,
    expansion: int = 4,
    norm: str = "layer",
    id2label: Mapping[int, str] | None = None,
) -> ScalingMLPConfig:
    """Our config for the official `BottleneckMLP` with these hyper-parameters and a 3-channel input."""
    labels = {"id2label": {int(i): str(label) for i, label in id2label.items()}} if id2label else {}
    if labels and len(labels["id2label"]) != num_classes:
        raise ValueError(f"id2label has {len(labels['id2label'])} labels but the model has {num_classes} classes")
    return ScalingMLPConfig(
        image_size=resolution,
        num_channels=3,
        num_blocks=num_blocks,
        hidden_size=hidden_size,
        expansion_factor=expansion,
        hidden_act="gelu",  # the official block uses nn.GELU(), the exact (erf) form
        norm_type=norm,
        layer_norm_eps=1e-5,  # PyTorch's default, which the official norms keep
        num_labels=num_classes,
        **labels,
    )


def convert_state_dict(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state dict to ours: `mlp.` in front of everything but `linear_out` (the keys and shapes
    are checked when it loads, `hfpapers.checkpoints.load_state_dict_checked`)."""
    state_dict = checkpoints.strip_wrapper_prefixes(official)
    return {(key if key.startswith("linear_out.") else f"mlp.{key}"): tensor for key, tensor in state_dict.items()}


def _describe(config: ScalingMLPConfig) -> str:
    return (
        f"B_{config.num_blocks}-Wi_{config.hidden_size}-E_{config.expansion_factor}, {config.image_size}x"
        f"{config.image_size}x{config.num_channels} input, {config.num_labels} classes, norm {config.norm_type!r}"
    )


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Read the hyper-parameters off the shapes of an official (prefix-free) state dict."""
    for key in ("linear_in.weight", "blocks.0.block.0.weight", "linear_out.weight"):
        if key not in state_dict:
            raise ValueError(
                f"not an official BottleneckMLP state dict: no {key!r} (keys: {checkpoints.listing(state_dict)})"
            )
    hidden_size, input_dim = state_dict["linear_in.weight"].shape
    wide = state_dict["blocks.0.block.0.weight"].shape[0]
    if wide % hidden_size:
        raise ValueError(f"block width {wide} is not a multiple of the residual width {hidden_size}")
    resolution = math.isqrt(input_dim // 3)
    if 3 * resolution**2 != input_dim:
        raise ValueError(f"linear_in takes {input_dim} inputs, which is not 3 * resolution**2 for any resolution")
    block_ids = {int(m[1]) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))}
    if any(key.endswith(".running_mean") for key in state_dict):
        norm = "batch"
    elif any(key.startswith("layernorms.") for key in state_dict):
        norm = "layer"
    else:
        norm = "none"
    return {
        "num_blocks": max(block_ids) + 1,
        "hidden_size": hidden_size,
        "expansion": wide // hidden_size,
        "num_classes": state_dict["linear_out.weight"].shape[0],
        "resolution": resolution,
        "norm": norm,
    }


def _claims_of_official_config(official_config: Mapping) -> dict:
    """What the official JSON config says about the architecture.

    Its `num_classes` and `dataset` are not used: the released fine-tuned checkpoints come with the JSON of their
    ImageNet-21k pre-training run (11,230 classes), so only the weights know the head.
    """
    if official_config.get("model", "BottleneckMLP") != "BottleneckMLP":
        raise ValueError(
            f"only the official BottleneckMLP converts; the config says model={official_config['model']!r}"
        )
    claims = {}
    if "architecture" in official_config:
        claims.update(parse_model_name(official_config["architecture"]))
    if "normalization" in official_config:
        claims["norm"] = official_config["normalization"]
    resolution = official_config.get("crop_resolution") or official_config.get("resolution")
    if resolution is not None:
        claims["resolution"] = int(resolution)
    return claims


def config_for_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    model_name: str | None = None,
    official_config: Mapping | None = None,
    id2label: Mapping[int, str] | None = None,
) -> ScalingMLPConfig:
    """The config of an official state dict: inferred from its shapes and checked against the name and JSON."""
    inferred = infer_architecture(checkpoints.strip_wrapper_prefixes(state_dict))
    sources = []
    if model_name is not None:
        sources.append((f"model name {model_name!r}", parse_model_name(model_name)))
    if official_config is not None:
        sources.append(("official config", _claims_of_official_config(official_config)))
    for source, claims in sources:
        disagreements = [
            f"{field}={value} (weights: {inferred[field]})"
            for field, value in claims.items()
            if inferred[field] != value
        ]
        if disagreements:
            raise ValueError(f"{source} disagrees with the checkpoint's shapes: {', '.join(disagreements)}")
    return config_from_official(**inferred, id2label=id2label)


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (see `hfpapers.checkpoints.load_checkpoint`): the official files have no extension and are
    pickles of a bare state dict."""
    state_dict = checkpoints.load_checkpoint(path)
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{path} holds a {type(state_dict).__name__}, not a state dict (torch.save(model.state_dict()))"
        )
    return dict(state_dict)


def image_processor_for(config: ScalingMLPConfig, dataset: str | None = None):
    """The processor with the official normalisation of `dataset` (default: the one with the model's class count)."""
    if dataset is None:
        by_classes = {n: name for name, n in DATASET_NUM_CLASSES.items()}
        if config.num_labels not in by_classes:
            raise ValueError(
                f"cannot tell the dataset of a {config.num_labels}-class head; pass dataset= one of "
                f"{', '.join(DATASET_MEAN_STD)}"
            )
        dataset = by_classes[config.num_labels]
    if dataset not in DATASET_MEAN_STD:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_MEAN_STD)}")
    # A mismatch here has happened with the released files: one alias fetches another dataset's weights.
    if DATASET_NUM_CLASSES[dataset] != config.num_labels:
        raise ValueError(
            f"{dataset} has {DATASET_NUM_CLASSES[dataset]} classes but the checkpoint's head has {config.num_labels}"
        )
    processor = build_image_processor(config)
    processor.image_mean, processor.image_std = map(list, DATASET_MEAN_STD[dataset])
    return processor


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    model_name: str | None = None,
    config_json: str | Path | Mapping | None = None,
    id2label: Mapping[int, str] | None = None,
    dataset: str | None = None,
) -> ScalingMLPForImageClassification:
    """Convert the official checkpoint at `checkpoint_path` into `output_dir` (model, config and image processor).

    `config_json` is the official JSON config (a path or the loaded dict); `dataset` picks the normalisation.
    Returns the converted model.
    """
    official = load_official_state_dict(checkpoint_path)
    if config_json is not None and not isinstance(config_json, Mapping):
        config_json = json.loads(Path(config_json).read_text())
    config = config_for_checkpoint(official, model_name, config_json, id2label)
    processor = image_processor_for(config, dataset)
    model = ScalingMLPForImageClassification(config)
    checkpoints.load_state_dict_checked(model, convert_state_dict(official),
                                        f"the checkpoint ({_describe(config)})")
    model.eval()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hfpapers convert scaling-mlp CHECKPOINT OUTPUT_DIR` (CHECKPOINT: a torch.save state dict or
    .safetensors file)."""
    parser.add_argument(
        "--model-name", help="official architecture name, e.g. B_12-Wi_1024 (checked against the weights)"
    )
    parser.add_argument("--config", help="official JSON config (config.txt / *_config), checked against the weights")
    parser.add_argument("--dataset", choices=sorted(DATASET_MEAN_STD),
                        help="dataset whose normalisation to use (default: the one with the head's class count)")


def convert(checkpoint: str | Path, output_dir: str | Path, model_name: str | None = None,
            config: str | Path | None = None, dataset: str | None = None) -> str:
    """`convert_checkpoint` for `hfpapers convert`: returns what was written."""
    model = convert_checkpoint(checkpoint, output_dir, model_name, config, dataset=dataset)
    return f"wrote {_describe(model.config)} ({model.num_parameters():,} parameters) to {output_dir}"


def main(argv: list[str] | None = None) -> int:
    """`python -m hfpapers.methods.scaling_mlp.convert_scaling_mlp ...`: `hfpapers convert scaling-mlp ...`."""
    from ...cli import main as cli_main

    return cli_main(["convert", "scaling-mlp", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
