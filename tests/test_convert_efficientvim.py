"""The EfficientViM converter against state dicts written from the official naming rules (not from our model)."""

import re
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification

import hfpapers  # noqa: F401  (registers the Auto classes)
from hfpapers.checkpoints import load_state_dict_checked
from hfpapers.methods.efficientvim.configuration_efficientvim import EfficientViMConfig
from hfpapers.methods.efficientvim.convert_efficientvim import (
    config_from_state_dict,
    convert_checkpoint,
    convert_state_dict,
    main,
    unwrap_checkpoint,
)
from hfpapers.methods.efficientvim.modeling_efficientvim import EfficientViMForImageClassification

SMALL = {"embed_dim": [16, 24, 32], "depths": [1, 2, 1], "state_dim": [4, 3, 2], "num_labels": 5}


def make_divisible(value, divisor=8):
    """timm's make_divisible(round_limit=0.), which sizes the SqueezeExcite reduction."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def official_shapes(embed_dim, depths, state_dim, num_labels, distillation=False, mlp_ratio=4):
    """Key -> shape of the official `EfficientViM(...).state_dict()`, from its module tree:

    - `patch_embed.conv.K` (K=0..3): 3x3 stride-2 ConvLayer2D, widths 3 -> D/8 -> D/4 -> D/2 -> D.
    - ConvLayer2D = `conv.weight` (bias-free) + BatchNorm `norm.{weight,bias,running_mean,running_var,
      num_batches_tracked}`.
    - `stages.S.blocks.B`: `alpha` (4, C); LayerNorm1D `norm.{weight,bias}` (1, C, 1); HSM-SSD `mixer.A` (N,),
      `mixer.D` (1,), Conv1d 1x1 `mixer.{BCdt_proj (3N, C, 1), hz_proj (2C, C, 1), out_proj (C, C, 1)}.conv.weight`,
      depthwise `mixer.dw.conv.weight` (3N, 1, 3, 3) without norm; ConvLayer2D depthwise `dwconv1`, `dwconv2`;
      FFN `ffn.fc1` (1x1, C -> ratio*C), `ffn.fc2` (1x1, back to C).
    - `stages.S.downsample` (S=0, 1; PatchMerging C -> C', hidden 4C'): ConvLayer2D depthwise `dwconv1` (C),
      `conv.0` (1x1 C -> hidden), `conv.1` (depthwise 3x3 stride 2), SqueezeExcite `conv.2.fc{1,2}.{weight,bias}`
      (biased 1x1 Conv2d, reduction make_divisible(hidden / 4, 8)), `conv.3` (1x1 hidden -> C'),
      depthwise `dwconv2` (C').
    - head: `weights` (4,), LayerNorm1D `norm.{0,1,2}` (1, C_i, 1), LayerNorm2D `norm.3` (1, C_2, 1, 1),
      Linear `heads.{0..3}` from C_0, C_1, C_2, C_2; with distillation `weights_dist` and `heads_dist.*` too.
    """
    shapes = {}

    def conv_layer(prefix, out_dim, in_per_group, kernel):
        shapes[f"{prefix}.conv.weight"] = (out_dim, in_per_group, kernel, kernel)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{name}"] = (out_dim,)
        shapes[f"{prefix}.norm.num_batches_tracked"] = ()

    widths = [3] + [embed_dim[0] // d for d in (8, 4, 2, 1)]
    for k in range(4):
        conv_layer(f"patch_embed.conv.{k}", widths[k + 1], widths[k], 3)
    for s, (dim, depth, n) in enumerate(zip(embed_dim, depths, state_dim)):
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}"
            shapes[f"{p}.alpha"] = (4, dim)
            shapes[f"{p}.norm.weight"] = shapes[f"{p}.norm.bias"] = (1, dim, 1)
            shapes[f"{p}.mixer.A"] = (n,)
            shapes[f"{p}.mixer.D"] = (1,)
            shapes[f"{p}.mixer.BCdt_proj.conv.weight"] = (3 * n, dim, 1)
            shapes[f"{p}.mixer.dw.conv.weight"] = (3 * n, 1, 3, 3)
            shapes[f"{p}.mixer.hz_proj.conv.weight"] = (2 * dim, dim, 1)
            shapes[f"{p}.mixer.out_proj.conv.weight"] = (dim, dim, 1)
            conv_layer(f"{p}.dwconv1", dim, 1, 3)
            conv_layer(f"{p}.dwconv2", dim, 1, 3)
            conv_layer(f"{p}.ffn.fc1", int(mlp_ratio * dim), dim, 1)
            conv_layer(f"{p}.ffn.fc2", dim, int(mlp_ratio * dim), 1)
        if s < 2:
            p, out_dim = f"stages.{s}.downsample", embed_dim[s + 1]
            hidden = 4 * out_dim
            reduced = make_divisible(hidden * 0.25)
            conv_layer(f"{p}.dwconv1", dim, 1, 3)
            conv_layer(f"{p}.conv.0", hidden, dim, 1)
            conv_layer(f"{p}.conv.1", hidden, 1, 3)
            shapes[f"{p}.conv.2.fc1.weight"] = (reduced, hidden, 1, 1)
            shapes[f"{p}.conv.2.fc1.bias"] = (reduced,)
            shapes[f"{p}.conv.2.fc2.weight"] = (hidden, reduced, 1, 1)
            shapes[f"{p}.conv.2.fc2.bias"] = (hidden,)
            conv_layer(f"{p}.conv.3", out_dim, hidden, 1)
            conv_layer(f"{p}.dwconv2", out_dim, 1, 3)
    head_dims = list(embed_dim) + [embed_dim[-1]]
    for i, dim in enumerate(head_dims):
        shapes[f"norm.{i}.weight"] = shapes[f"norm.{i}.bias"] = (1, dim, 1) if i < 3 else (1, dim, 1, 1)
    for prefix in ("",) + (("_dist",) if distillation else ()):
        shapes[f"weights{prefix}"] = (4,)
        for i, dim in enumerate(head_dims):
            shapes[f"heads{prefix}.{i}.weight"] = (num_labels, dim)
            shapes[f"heads{prefix}.{i}.bias"] = (num_labels,)
    return shapes


def official_state_dict(seed=0, device="cpu", **architecture):
    """Random official-format weights (running variances positive, step counters integer)."""
    generator = torch.Generator().manual_seed(seed) if device == "cpu" else None
    state_dict = {}
    for key, shape in official_shapes(**architecture).items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.tensor(7, device=device)
        elif key.endswith("running_var"):
            state_dict[key] = torch.rand(shape, generator=generator, device=device) + 0.5
        else:
            state_dict[key] = 0.3 * torch.randn(shape, generator=generator, device=device)
    return state_dict


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: OpenMP threads only add synchronisation, which costs seconds on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides):
    return EfficientViMConfig(**{**SMALL, "image_size": 64, **overrides})


def loaded_model(state_dict, config):
    model = EfficientViMForImageClassification(config)
    return load_state_dict_checked(model, convert_state_dict(state_dict, config), "the checkpoint").eval()


def logits(model, seed=0):
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(pixel_values=pixels).logits


# (a) official keys


def test_official_state_dict_converts_every_key_and_loads_strict():
    official = official_state_dict(**SMALL)
    config = small_config()
    converted = convert_state_dict(official, config)
    model = EfficientViMForImageClassification(config)
    assert converted.keys() == model.state_dict().keys()
    model.load_state_dict(converted, strict=True)
    for key, tensor in official.items():
        ours = f"efficientvim.{key}" if key.startswith(("patch_embed.", "stages.")) else key
        assert torch.equal(model.state_dict()[ours], tensor), key


def test_config_is_inferred_from_the_weights():
    official = official_state_dict(**SMALL, distillation=True)
    config = config_from_state_dict(official)
    assert (list(config.embed_dim), list(config.depths), list(config.state_dim)) == (
        SMALL["embed_dim"], SMALL["depths"], SMALL["state_dim"])
    assert (config.num_labels, config.distillation, config.mlp_ratio, config.image_size) == (5, True, 4.0, 224)
    assert config_from_state_dict(official, image_size=64).image_size == 64


def test_paper_variants_are_recognised_with_their_resolution():
    """Shapes only (meta tensors): M4 evaluates at 256 px, the others at 224."""
    record = hfpapers.get_method("efficientvim")
    for variant, size in (("M1", 224), ("M4", 256)):
        preset = record.preset(variant)
        architecture = {k: preset[k] for k in ("embed_dim", "depths", "state_dim", "num_labels")}
        config = config_from_state_dict(official_state_dict(device="meta", **architecture))
        assert (list(config.depths), list(config.state_dim), config.image_size) == (
            preset["depths"], preset["state_dim"], size)


def test_missing_step_counters_are_filled():
    official = {k: v for k, v in official_state_dict(**SMALL).items() if not k.endswith("num_batches_tracked")}
    converted = convert_state_dict(official, small_config())
    assert converted["efficientvim.patch_embed.conv.0.norm.num_batches_tracked"] == 0
    loaded_model(official, small_config())


# (b) timm format and envelopes


def test_timm_flattened_layer_norms_are_reshaped():
    official = official_state_dict(**SMALL)
    layer_norms = [k for k in official if re.fullmatch(r"(stages\.\d\.blocks\.\d\.norm|norm\.\d)\.(weight|bias)", k)]
    assert len(layer_norms) == 2 * sum(SMALL["depths"]) + 2 * 4
    timm_style = {k: (v.flatten() if k in layer_norms else v) for k, v in official.items()}
    config = small_config()
    converted = convert_state_dict(timm_style, config)
    assert converted["norm.3.bias"].shape == (1, 32, 1, 1)
    assert converted["efficientvim.stages.1.blocks.1.norm.bias"].shape == (1, 24, 1)
    torch.testing.assert_close(logits(loaded_model(timm_style, config)), logits(loaded_model(official, config)),
                               rtol=0, atol=0)


def test_envelope_prefers_ema_weights():
    raw, ema = official_state_dict(seed=1, **SMALL), official_state_dict(seed=2, **SMALL)
    envelope = {"model": raw, "model_ema": ema, "epoch": 299, "max_accuracy": 72.9}
    assert unwrap_checkpoint(envelope) is not raw
    converted = convert_state_dict(envelope, small_config())
    assert torch.equal(converted["heads.0.weight"], ema["heads.0.weight"])
    assert not torch.equal(converted["heads.0.weight"], raw["heads.0.weight"])
    assert torch.equal(unwrap_checkpoint({"model": raw, "epoch": 3})["weights"], raw["weights"])


def test_state_dict_envelope_and_wrapper_prefixes():
    official = official_state_dict(**SMALL)
    wrapped = {"state_dict": {f"module._orig_mod.{k}": v for k, v in official.items()}}
    assert unwrap_checkpoint(wrapped).keys() == official.keys()


def test_unknown_envelope_names_its_keys():
    with pytest.raises(ValueError, match="top-level keys: epoch, weights_of_model"):
        unwrap_checkpoint({"weights_of_model": {}, "epoch": 3})


# (c) errors


def _conversion_error(official, config=None) -> str:
    with pytest.raises(ValueError) as error:
        loaded_model(official, config or small_config())
    return str(error.value)


def test_missing_unexpected_and_mismatched_keys_are_listed():
    official = official_state_dict(**SMALL)
    del official["stages.1.blocks.1.mixer.hz_proj.conv.weight"]
    official["stages.0.blocks.0.mixer.extra"] = torch.zeros(3)
    official["heads.2.bias"] = torch.zeros(6)
    message = _conversion_error(official)
    assert "missing keys (1): efficientvim.stages.1.blocks.1.mixer.hz_proj.conv.weight" in message
    assert "unexpected keys (1): stages.0.blocks.0.mixer.extra" in message
    assert "shape mismatches (1): heads.2.bias checkpoint (6,) vs model (5,)" in message


def test_other_variant_is_named():
    official = official_state_dict(**{**SMALL, "embed_dim": [16, 32, 48]})
    message = _conversion_error(official)
    assert "different variant" in message
    assert "checkpoint has embed_dim [16, 32, 48], config expects [16, 24, 32]" in message
    message = _conversion_error(official_state_dict(**{**SMALL, "depths": [1, 1, 1], "num_labels": 7}))
    assert "checkpoint has depths [1, 1, 1], config expects [1, 2, 1]" in message
    assert "checkpoint has num_labels 7, config expects 5" in message


def test_distillation_head_must_match_or_be_dropped_explicitly():
    distilled = official_state_dict(**SMALL, distillation=True)
    assert "drop_distillation_head" in _conversion_error(distilled)
    converted = convert_state_dict(distilled, small_config(), drop_distillation_head=True)
    assert not any("dist" in key for key in converted)
    assert "no distillation head" in _conversion_error(official_state_dict(**SMALL), small_config(distillation=True))
    distilled_model = loaded_model(distilled, small_config(distillation=True))
    assert distilled_model.heads_dist is not None


# (d) files


@pytest.fixture
def fake_yacs(monkeypatch):
    """A stand-in `yacs.config.CfgNode` (a dict subclass keeping bookkeeping in `__dict__`, as yacs does)."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__renamed_keys__": {},
                                  "__new_allowed__": False})

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


def _official_envelope(CfgNode, model, model_ema):
    """The layout of the official `save_checkpoint_ema`."""
    config = CfgNode(MODEL=CfgNode(NAME="EfficientViM_M1"), DATA=CfgNode(IMG_SIZE=64))
    return {"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-3, "betas": (0.9, 0.999)}]},
            "lr_scheduler": {"t_initial": 290}, "max_accuracy": 72.9, "scaler": {"scale": 65536.0}, "epoch": 299,
            "config": config, "steps": 0, "model_ema": model_ema, "max_accuray_ema": 73.5}


def test_official_pth_with_yacs_config_converts_to_a_loadable_folder(tmp_path, fake_yacs, monkeypatch):
    raw, ema = official_state_dict(seed=1, **SMALL), official_state_dict(seed=2, **SMALL)
    path = tmp_path / "EfficientViM_small.pth"
    torch.save(_official_envelope(fake_yacs, raw, ema), path)
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")

    convert_checkpoint(path, tmp_path / "out", image_size=64)
    converted = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert type(converted) is EfficientViMForImageClassification
    assert converted.config.image_size == 64
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    direct = loaded_model(ema, small_config())
    for key, tensor in direct.state_dict().items():
        assert torch.equal(converted.state_dict()[key], tensor), key
    # Not bitwise: tensors read from safetensors are not 64-byte aligned, which changes the CPU kernels' rounding.
    torch.testing.assert_close(logits(converted), logits(direct), rtol=1e-5, atol=1e-6)


def test_cli_converts_and_reports_errors_on_one_line(tmp_path, capsys):
    distilled = official_state_dict(**SMALL, distillation=True)
    path = tmp_path / "small_dist.pth"
    torch.save({"model": distilled}, path)
    assert main([str(path), str(tmp_path / "plain"), "--variant", "tiny"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("hfpapers convert: error: ") and error.count("\n") == 1 and "distillation" in error
    assert main([str(path), str(tmp_path / "plain"), "--image-size", "64", "--drop-distillation-head"]) == 0
    assert "LABEL_" in capsys.readouterr().out
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "plain")
    assert plain.config.distillation is False and plain.heads_dist is None


def test_safetensors_file_converts(tmp_path):
    official = official_state_dict(**SMALL)
    save_file(official, tmp_path / "small.safetensors")
    model = convert_checkpoint(tmp_path / "small.safetensors", tmp_path / "out", image_size=64)
    assert torch.equal(model.heads[3].weight, official["heads.3.weight"])


def test_refused_global_is_named(tmp_path):
    path = tmp_path / "with_code.pth"
    torch.save({"model": official_state_dict(**SMALL), "hook": RefusedGlobal()}, path)
    with pytest.raises(ValueError, match=r"refused the global \S*RefusedGlobal"):
        convert_checkpoint(path, tmp_path / "out")


class RefusedGlobal:
    """Any class outside torch's allow-list: weights-only loading must not build it."""
