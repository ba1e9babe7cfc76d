"""The one checked loader of official checkpoints (`hfpapers.checkpoints`) and `hfpapers convert`."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hfpapers
from hfpapers.checkpoints import load_state_dict_checked
from hfpapers.cli import main


def two_layers():
    return nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))


def official_mlp(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An official Scaling MLPs state dict (B_1-Wi_4, 4x4 RGB input, 10 classes) in `dtype`, random values."""
    g = torch.Generator().manual_seed(0)
    shapes = {"linear_in.weight": (4, 48), "linear_in.bias": (4,), "blocks.0.block.0.weight": (16, 4),
              "blocks.0.block.0.bias": (16,), "blocks.0.block.2.weight": (4, 16), "blocks.0.block.2.bias": (4,),
              "layernorms.0.weight": (4,), "layernorms.0.bias": (4,), "linear_out.weight": (10, 4),
              "linear_out.bias": (10,)}
    return {key: torch.randn(shape, generator=g).to(dtype) for key, shape in shapes.items()}


def test_missing_unexpected_and_misshaped_keys_are_one_error_with_counts():
    state_dict = {"0.weight": torch.zeros(2, 4), "1.weight": torch.ones(2), "1.bias": torch.zeros(2),
                  "2.weight": torch.zeros(1), "2.bias": torch.zeros(1)}  # 0.bias missing, 2.* extra, 0.weight wrong
    model = two_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_state_dict_checked(model, state_dict, "the test checkpoint")
    assert str(error.value) == (
        "the test checkpoint does not fit the model: missing keys (1): 0.bias; unexpected keys (2): 2.bias, 2.weight; "
        "shape mismatches (1): 0.weight checkpoint (2, 4) vs model (2, 3)")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing loaded
    many = {f"extra.{i:02d}": torch.zeros(1) for i in range(12)}
    with pytest.raises(ValueError, match=r"unexpected keys \(12\): extra\.00, .*extra\.09, \.\.\. \(2 more\)"):
        load_state_dict_checked(two_layers(), {**two_layers().state_dict(), **many}, "it")
    with pytest.raises(ValueError, match="not tensors: 1.bias"):
        load_state_dict_checked(two_layers(), {**two_layers().state_dict(), "1.bias": [0.0, 0.0]}, "it")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_converts_without_a_float32_round_trip(dtype, tmp_path, capsys):
    official = official_mlp(dtype)
    # 1 + 2**-8 is exact in float16 and not in bfloat16; 2**-20 is exact in bfloat16 and not in float16: had the
    # weights passed through the other half type on the way, these would differ.
    official["linear_out.bias"][:2] = torch.tensor([1 + 2**-8, 2**-20]).to(dtype)
    torch.save(official, tmp_path / "official.pt")
    assert main(["convert", "scaling-mlp", str(tmp_path / "official.pt"), str(tmp_path / "out")]) == 0
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for key, tensor in official.items():
        ours = saved[key if key.startswith("linear_out.") else f"mlp.{key}"]
        assert ours.dtype == dtype and torch.equal(ours.view(torch.int16), tensor.view(torch.int16)), key
    from transformers import AutoModelForImageClassification

    assert AutoModelForImageClassification.from_pretrained(tmp_path / "out").dtype == dtype


def test_mixed_dtypes_build_the_widest_and_a_narrowing_partial_load_is_refused():
    state_dict = {"0.weight": torch.randn(2, 3, dtype=torch.float16), "0.bias": torch.randn(2, dtype=torch.bfloat16),
                  "1.weight": torch.ones(2), "1.bias": torch.zeros(2)}
    model = load_state_dict_checked(two_layers(), state_dict, "mixed")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # float16 and bfloat16 both fit float32 exactly
    assert torch.equal(model[0].weight, state_dict["0.weight"].float())
    half = two_layers().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"round 1 tensors to a narrower dtype \(0\.weight torch\.float32 -> "
                                         r"torch\.bfloat16\)"):
        load_state_dict_checked(half, {"0.weight": torch.randn(2, 3)}, "an adapter", expected_keys=["0.weight"])


class WritesAMarker:
    """A pickle that, unpickled without weights-only, creates a file (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_pickle_with_code_is_refused_by_hfpapers_convert_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"linear_in.weight": WritesAMarker(marker)}, path)
    torch.load(path, weights_only=False)  # the plant works: a full unpickle runs it
    assert marker.exists()
    marker.unlink()
    assert main(["convert", "scaling-mlp", str(path), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("hfpapers convert: error: ") and error.count("\n") == 1
    assert "weights-only loading refused the global exec;" in error  # torch names builtins bare
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_every_converter_has_the_interface_and_a_method_without_one_is_a_clear_error(tmp_path, capsys):
    converters = {r.slug: r.converter for r in hfpapers.list_methods() if r.converter}
    assert set(converters) >= {"scaling-mlp", "efficientvim", "llm-embedding", "layerdiffusion", "read"}
    for module in map(importlib.import_module, converters.values()):
        assert callable(module.add_arguments) and callable(module.convert), module.__name__
    without = next(r.slug for r in hfpapers.list_methods() if not r.converter)
    assert main(["convert", without, str(tmp_path / "x"), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert f"{without!r} has no converter of official checkpoints; methods with one: " in error
    assert main(["convert", "no-such-method", "x", "out"]) == 1
    assert "unknown method 'no-such-method'" in capsys.readouterr().err
