"""The common model tester: every model class of every registered method, at its tiny preset."""

import re

import pytest
import torch
from safetensors.torch import load_file

import hfpapers
from hfpapers.testing.tiny import tiny_inputs, wrong_inputs

CASES = [(record, auto_name) for record in hfpapers.list_methods() if record.kind == "model"
         for auto_name in record.model_classes]
IDS = [f"{record.slug}-{auto_name}" for record, auto_name in CASES]


def build(record, auto_name):
    torch.manual_seed(0)
    return hfpapers.create_model(record.slug, preset="tiny", head=auto_name)


def first_output(outputs) -> torch.Tensor:
    for name in ("logits", "embeddings", "last_hidden_state", "predicted_depth"):
        if name in outputs:
            return outputs[name]


@pytest.mark.parametrize(("record", "auto_name"), CASES, ids=IDS)
def test_output_shapes(record, auto_name):
    model = build(record, auto_name).eval()
    out = first_output(model(**tiny_inputs(record.task, model.config, batch_size=3)))
    assert out.shape[0] == 3
    if auto_name == "AutoModelForImageClassification":
        assert out.shape == (3, model.config.num_labels)


@pytest.mark.parametrize(("record", "auto_name"), CASES, ids=IDS)
def test_save_load_round_trip_is_bit_exact_through_the_auto_class(record, auto_name, tmp_path):
    import transformers

    model = build(record, auto_name).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = getattr(transformers, auto_name).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert load_file(tmp_path / "model.safetensors")  # (keys may be in transformers' legacy checkpoint layout)
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    inputs = tiny_inputs(record.task, model.config)
    with torch.no_grad():
        # The weights are bit-equal (above); the outputs only to rounding: the loaded weights are memory-mapped
        # and unaligned, and with one thread oneDNN's convolution takes another code path on them (2e-10 apart).
        torch.testing.assert_close(first_output(loaded(**inputs)), first_output(model(**inputs)),
                                   rtol=1e-6, atol=1e-6)


# READ's SAM image encoder runs without a graph and its LM head does not reach the masks: its recipe decides
# what trains, and tests/test_read.py checks that every weight it trains gets a gradient.
GRADIENT_CASES = [(r, a) for r, a in CASES if r.task != "reasoning-segmentation"]


@pytest.mark.parametrize(("record", "auto_name"), GRADIENT_CASES, ids=[f"{r.slug}-{a}" for r, a in GRADIENT_CASES])
def test_gradient_reaches_every_trainable_parameter(record, auto_name):
    model = build(record, auto_name).train()
    # Modules that a model trains through a loss of their own only name themselves in `_trained_by_own_loss`.
    own_loss = tuple(getattr(model, "_trained_by_own_loss", ()))
    trainable = [(n, p) for n, p in model.named_parameters()
                 if p.requires_grad and not set(n.split(".")) & set(own_loss)]
    with torch.no_grad():  # moves zero-initialised factors (LoRA's B) off zero, where they would block A
        for _, p in trainable:
            p.add_(torch.randn_like(p) * 0.01)
    out = first_output(model(**tiny_inputs(record.task, model.config)))
    (out * torch.randn_like(out)).sum().backward()  # not a norm: normalised outputs have a constant norm
    silent = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"no gradient reaches {silent}"


@pytest.mark.parametrize(("record", "auto_name"), CASES, ids=IDS)
def test_eval_mode_outputs_do_not_depend_on_the_rest_of_the_batch(record, auto_name):
    model = build(record, auto_name).eval()
    inputs = tiny_inputs(record.task, model.config, batch_size=4)
    with torch.no_grad():
        batched = first_output(model(**inputs))
        for i in range(4):
            alone = first_output(model(**{k: v[i:i + 1] for k, v in inputs.items()}))
            torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("record", "auto_name"), CASES, ids=IDS)
def test_wrong_input_shape_raises_an_error_naming_the_expected_shape(record, auto_name):
    model = build(record, auto_name)
    bad = wrong_inputs(record.task, model.config)
    with pytest.raises(ValueError) as error:
        model(**bad)
    got = tuple(next(iter(bad.values())).shape)
    assert re.search(r"\(batch, [^)]*\)", str(error.value)) and str(got) in str(error.value)
