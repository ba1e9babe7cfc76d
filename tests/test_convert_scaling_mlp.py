"""Conversion of official Scaling MLPs checkpoints (gregorbachmann/scaling_mlps) to ScalingMLPForImageClassification.

The official state dicts here are written by hand from the official layout (linear_in, blocks.i.block.{0,2},
layernorms.i, linear_out), and the official forward is recomputed with plain tensor ops, so neither depends on
our model code.
"""

from __future__ import annotations

import math

import pytest
import torch

import hfpapers  # registers the model with the transformers Auto classes
from hfpapers.methods.scaling_mlp.convert_scaling_mlp import (
    config_for_checkpoint,
    config_from_official,
    convert_checkpoint,
    convert_state_dict,
    main,
)
from hfpapers.checkpoints import load_state_dict_checked
from hfpapers.methods.scaling_mlp.modeling_scaling_mlp import ScalingMLPForImageClassification

NUM_BLOCKS, WIDTH, EXPANSION, RESOLUTION, NUM_CLASSES = 2, 16, 4, 8, 10
INPUT_DIM = 3 * RESOLUTION * RESOLUTION
CIFAR_MEAN = [0.49139968, 0.48215827, 0.44653124]


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official BottleneckMLP's key names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    wide = EXPANSION * WIDTH
    state_dict = {
        "linear_in.weight": rand(WIDTH, INPUT_DIM, scale=INPUT_DIM**-0.5),
        "linear_in.bias": rand(WIDTH, scale=0.1),
        "linear_out.weight": rand(NUM_CLASSES, WIDTH, scale=WIDTH**-0.5),
        "linear_out.bias": rand(NUM_CLASSES, scale=0.1),
    }
    for i in range(NUM_BLOCKS):
        state_dict[f"blocks.{i}.block.0.weight"] = rand(wide, WIDTH, scale=WIDTH**-0.5)
        state_dict[f"blocks.{i}.block.0.bias"] = rand(wide, scale=0.1)
        state_dict[f"blocks.{i}.block.2.weight"] = rand(WIDTH, wide, scale=wide**-0.5)
        state_dict[f"blocks.{i}.block.2.bias"] = rand(WIDTH, scale=0.1)
        state_dict[f"layernorms.{i}.weight"] = 1 + rand(WIDTH, scale=0.1)
        state_dict[f"layernorms.{i}.bias"] = rand(WIDTH, scale=0.1)
    return state_dict


def official_forward(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The official forward in float64: flatten (C, H, W), linear_in, pre-LN residual GELU blocks, linear_out."""
    sd = {key: value.double() for key, value in sd.items()}
    x = images.double().flatten(1) @ sd["linear_in.weight"].T + sd["linear_in.bias"]
    for i in range(NUM_BLOCKS):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        normed = (x - mean) / torch.sqrt(var + 1e-5) * sd[f"layernorms.{i}.weight"] + sd[f"layernorms.{i}.bias"]
        h = normed @ sd[f"blocks.{i}.block.0.weight"].T + sd[f"blocks.{i}.block.0.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ sd[f"blocks.{i}.block.2.weight"].T + sd[f"blocks.{i}.block.2.bias"]
    return x @ sd["linear_out.weight"].T + sd["linear_out.bias"]


@pytest.fixture(scope="module")
def official():
    return official_state_dict()


@pytest.fixture(scope="module")
def config():
    return config_from_official(NUM_BLOCKS, WIDTH, NUM_CLASSES, resolution=RESOLUTION, expansion=EXPANSION)


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))


def converted_model(state_dict, config):
    model = ScalingMLPForImageClassification(config).eval()
    return load_state_dict_checked(model, convert_state_dict(state_dict), "the checkpoint")


def test_mapping_covers_every_key_and_loads_strict(official, config):
    converted = convert_state_dict(official)
    model = ScalingMLPForImageClassification(config)
    assert set(converted) == set(model.state_dict())
    assert len(converted) == len(official)
    assert converted["linear_out.weight"] is official["linear_out.weight"]
    assert converted["mlp.blocks.1.block.2.bias"] is official["blocks.1.block.2.bias"]
    model.load_state_dict(converted, strict=True)


def test_logits_match_the_official_forward(official, config, images):
    with torch.no_grad():
        logits = converted_model(official, config)(pixel_values=images).logits
    expected = official_forward(official, images).float()
    assert (logits - expected).abs().max().item() <= 1e-5


def test_config_is_inferred_from_the_weights(official):
    config = config_for_checkpoint(official, model_name="B_2-Wi_16", official_config={
        "model": "BottleneckMLP", "architecture": "B_2-Wi_16-E_4", "normalization": "layer", "crop_resolution": 8,
        "num_classes": 11230,  # a fine-tuned release ships its pre-training JSON; the head comes from the weights
    })
    assert (config.num_blocks, config.hidden_size, config.expansion_factor) == (NUM_BLOCKS, WIDTH, EXPANSION)
    assert (config.image_size, config.num_labels, config.norm_type) == (RESOLUTION, NUM_CLASSES, "layer")


@pytest.mark.parametrize(
    "model_name, official_config, field",
    [("B_12-Wi_16", None, "num_blocks=12"), (None, {"crop_resolution": 64}, "resolution=64"),
     (None, {"normalization": "batch"}, "norm=batch")],
)
def test_name_or_json_that_disagrees_with_the_weights_is_refused(official, model_name, official_config, field):
    with pytest.raises(ValueError, match=field):
        config_for_checkpoint(official, model_name=model_name, official_config=official_config)


def _without(state_dict, key):
    return {k: v for k, v in state_dict.items() if k != key}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: _without(sd, "blocks.1.block.2.bias"), r"missing keys \(1\): mlp\.blocks\.1\.block\.2\.bias"),
        (lambda sd: {**sd, "head.weight": torch.zeros(3)}, r"unexpected keys \(1\): mlp\.head\.weight"),
        (lambda sd: {**sd, "linear_out.weight": torch.zeros(11, WIDTH)},
         r"linear_out\.weight checkpoint \(11, 16\) vs model \(10, 16\)"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_mismatching_state_dict_is_refused(official, config, edit, message):
    with pytest.raises(ValueError, match=message):
        converted_model(edit(official), config)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefix_is_accepted(official, config, images, prefix):
    prefixed = {prefix + key: value for key, value in official.items()}
    with torch.no_grad():
        logits = converted_model(prefixed, config)(pixel_values=images).logits
        reference = converted_model(official, config)(pixel_values=images).logits
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("filename", ["weights.pt", "epoch_20"])  # released files have no extension
def test_torch_save_file_round_trips_through_from_pretrained(official, images, tmp_path, filename):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    torch.save(official, tmp_path / filename)
    converted = convert_checkpoint(tmp_path / filename, tmp_path / "out", model_name="B_2-Wi_16")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is ScalingMLPForImageClassification
    with torch.no_grad():
        logits = loaded(pixel_values=images).logits
        assert torch.equal(logits, converted(pixel_values=images).logits)
    assert (logits - official_forward(official, images).float()).abs().max().item() <= 1e-5
    # a 10-class head gets CIFAR-10's normalisation unless told otherwise
    assert AutoImageProcessor.from_pretrained(tmp_path / "out").image_mean == pytest.approx(CIFAR_MEAN)


class NotATensor:
    pass


def test_pickle_with_code_is_refused_in_one_line(tmp_path, capsys):
    torch.save({"linear_in.weight": NotATensor()}, tmp_path / "evil.pt")
    assert main([str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("hfpapers convert: error: ") and error.count("\n") == 1
    assert "weights-only loading refused the global" in error
    assert not (tmp_path / "out").exists()
