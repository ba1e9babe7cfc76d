"""TrAct (arXiv 2410.23970): the first layer's weight gradient against the explicit formula of Eq. 10 built here
by hand (patches cut out by loops), its l -> infinity limit, the official torch-tract package and its own printed
values, the engine flag's SGD step, and the procedure's run on a tiny classifier."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfpapers.methods.tract import apply_tract, find_first_layer, remove_tract


def _grads(layer: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Weight, bias and input gradients of the batch-mean squared error, and dL/dz of the layer's output."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    z = layer(x)
    z.retain_grad()
    (z - target).pow(2).mean().backward()
    return layer.weight.grad.clone(), None if layer.bias is None else layer.bias.grad.clone(), x.grad.clone(), z.grad


def _explicit(grad_z_rows: torch.Tensor, rows: torch.Tensor, l: float) -> torch.Tensor:
    """Eq. 10 as printed: G^T X (X^T X / b + l I)^-1, with an explicit inverse."""
    b, n = rows.shape
    return grad_z_rows.T @ rows @ torch.linalg.inv(rows.T @ rows / b + l * torch.eye(n, dtype=rows.dtype))


@pytest.mark.parametrize("batch", [40, 3], ids=["b>=n", "woodbury"])
def test_linear_gradient_is_eq_10(batch):
    torch.manual_seed(0)
    layer = nn.Linear(12, 5).double()
    x, target = torch.randn(batch, 2, 12, dtype=torch.float64), torch.randn(batch, 2, 5, dtype=torch.float64)
    plain_w, plain_b, plain_x, grad_z = _grads(layer, x, target)
    assert apply_tract(layer, 0.1) == ""
    w, b, gx, _ = _grads(layer, x, target)
    expected = _explicit(grad_z.reshape(-1, 5), x.reshape(-1, 12), 0.1)
    torch.testing.assert_close(w, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(w, plain_w)
    torch.testing.assert_close(b, plain_b)  # only the weight gradient changes
    torch.testing.assert_close(gx, plain_x)


def _padded(x, left_right, mode):
    """The input as the convolution sees it, padded by hand (pairs per spatial dimension, first one first)."""
    pad = [p for pair in reversed(left_right) for p in pair]
    return F.pad(x, pad, mode="constant" if mode == "zeros" else mode)


def _patch_rows(x, kernel, stride, dilation, groups, group):
    """The rows X of one group by loops over output positions: (batch * positions, channels/groups * kernel)."""
    per_group = x.shape[1] // groups
    x = x[:, group * per_group:(group + 1) * per_group]
    spatial = x.shape[2:]
    out = [(s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(spatial, kernel, stride, dilation)]
    rows = []
    for n in range(x.shape[0]):
        for position in itertools.product(*(range(o) for o in out)):
            index = [slice(p * st, p * st + d * (k - 1) + 1, d)
                     for p, st, d, k in zip(position, stride, dilation, kernel)]
            rows.append(x[(n, slice(None), *index)].reshape(-1))
    return torch.stack(rows)


CONVS = {
    # name: (layer, input shape, (left, right) padding per spatial dimension as the layer should apply it)
    "official-case": (lambda: nn.Conv2d(2, 5, 3), (30, 2, 6, 4), [(0, 0), (0, 0)]),
    "stride-padding": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 6), [(1, 1), (1, 1)]),
    "patch-embedding": (lambda: nn.Conv2d(3, 6, 4, stride=4), (2, 3, 8, 8), [(0, 0), (0, 0)]),
    "woodbury": (lambda: nn.Conv2d(3, 4, 4, stride=4), (1, 3, 8, 8), [(0, 0), (0, 0)]),
    "dilation": (lambda: nn.Conv2d(2, 3, 3, dilation=2, padding=1), (2, 2, 7, 7), [(1, 1), (1, 1)]),
    "groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 5, 5), [(1, 1), (1, 1)]),
    # `same` with an even kernel pads asymmetrically: (d*(k-1))//2 before, the rest after.
    "same-even": (lambda: nn.Conv2d(2, 3, (4, 2), padding="same", dilation=(1, 2)), (2, 2, 6, 5), [(1, 2), (1, 1)]),
    "reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 5), [(1, 1), (1, 1)]),
    "circular-groups": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="circular"), (2, 4, 5, 4),
                        [(1, 1), (1, 1)]),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (3, 2, 9), [(1, 1)]),
    "conv3d": (lambda: nn.Conv3d(2, 3, (1, 2, 2), stride=(1, 2, 2)), (2, 2, 3, 4, 4), [(0, 0)] * 3),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_convolution_gradient_is_eq_10_on_hand_cut_patches(name):
    make, shape, left_right = CONVS[name]
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    target = torch.randn_like(layer(x))
    plain_w, plain_b, plain_x, grad_z = _grads(layer, x, target)
    apply_tract(layer, 0.2)
    w, b, gx, _ = _grads(layer, x, target)
    padded = _padded(x, left_right, layer.padding_mode)
    out_per_group = layer.out_channels // layer.groups
    expected = []
    for g in range(layer.groups):
        rows = _patch_rows(padded, layer.kernel_size, layer.stride, layer.dilation, layer.groups, g)
        # dL/dz as rows in the same order: (batch, positions...) by output channel.
        grad_rows = grad_z[:, g * out_per_group:(g + 1) * out_per_group].movedim(1, -1).reshape(-1, out_per_group)
        expected.append(_explicit(grad_rows, rows, 0.2).reshape(out_per_group, *layer.weight.shape[1:]))
    torch.testing.assert_close(w, torch.cat(expected), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(w, plain_w)
    torch.testing.assert_close(b, plain_b)
    torch.testing.assert_close(gx, plain_x)


@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(6, 4), (20, 6)), (lambda: nn.Linear(6, 4), (3, 6)),
                                         (lambda: nn.Conv2d(2, 3, 3, groups=1, padding="same"), (2, 2, 5, 5))],
                         ids=["linear", "linear-woodbury", "conv"])
def test_large_lambda_gives_the_plain_gradient_over_lambda(make, shape):
    """(X^T X / b + l I)^-1 -> I / l as l grows (paper §3)."""
    torch.manual_seed(1)
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    target = torch.randn_like(layer(x))
    plain = _grads(layer, x, target)[0]
    apply_tract(layer, 1e9)
    torch.testing.assert_close(_grads(layer, x, target)[0] * 1e9, plain, rtol=1e-6, atol=1e-12)


def test_the_official_codes_printed_gradients():
    """The values the official src/tract.py prints in its `__main__` (seed 0, x 30x8, MSE, l = 0.1), to the 4
    decimals it prints."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 8), torch.randn(30, 5)
    layer = nn.Linear(8, 5)
    apply_tract(layer, 0.1)
    (y - layer(x)).pow(2).mean().backward()
    expected = torch.tensor([
        [0.0741, 0.0949, -0.0559, -0.0398, -0.1364, 0.0013, 0.1603, -0.0468],
        [-0.0994, -0.1061, -0.1781, 0.1479, 0.1114, -0.0374, 0.0324, -0.1329],
        [0.0303, 0.0484, 0.1385, -0.1675, 0.0778, -0.0854, -0.0592, 0.0526],
        [-0.0726, 0.1049, 0.0998, 0.0420, -0.1409, -0.0031, -0.0432, -0.1150],
        [0.1438, -0.0729, -0.0261, -0.1015, -0.0902, 0.1821, -0.1520, 0.0950]])
    torch.testing.assert_close(layer.weight.grad, expected, rtol=0, atol=6e-5)
    torch.testing.assert_close(layer.bias.grad, torch.tensor([-0.1162, 0.1062, -0.1275, -0.0206, -0.1149]),
                               rtol=0, atol=6e-5)


@pytest.mark.parametrize("case", ["linear", "linear-woodbury", "conv", "conv-woodbury"])
def test_same_gradients_as_torch_tract(case):
    """The official package (PyPI torch-tract 1.0.0) on the cases it supports: Linear and Conv2d with integer
    stride and padding, both of its forms."""
    torch_tract = pytest.importorskip("torch_tract")
    make, shape = {"linear": (lambda: nn.Linear(8, 5), (30, 8)), "linear-woodbury": (lambda: nn.Linear(8, 5), (4, 8)),
                   "conv": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), (4, 3, 8, 8)),
                   "conv-woodbury": (lambda: nn.Conv2d(3, 6, 4, stride=4), (1, 3, 8, 8))}[case]
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    target = torch.randn_like(layer(x))
    official = _grads(torch_tract.TrAct(layer, l=0.1), x, target)  # shares the layer's parameters
    apply_tract(layer, 0.1)
    ours = _grads(layer, x, target)
    for a, b in zip(official[:3], ours[:3]):
        torch.testing.assert_close(b, a.reshape(b.shape), rtol=1e-10, atol=1e-13)


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=16, num_labels=3))


def test_finds_the_patch_embedding_of_hf_models_and_keeps_their_weights():
    from transformers import ResNetConfig, ResNetForImageClassification

    import hfpapers

    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1],
                                                       num_labels=3))
    vit = _tiny_vit()
    mlp = hfpapers.create_model("scaling-mlp", preset="tiny")
    assert apply_tract(vit) == "vit.embeddings.patch_embeddings.projection"
    assert apply_tract(resnet) == "resnet.embedder.embedder.convolution"
    assert apply_tract(mlp) == "mlp.linear_in"
    keys = list(vit.state_dict())
    loss = vit(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert list(vit.state_dict()) == keys  # nothing renamed: save_pretrained writes the plain model
    assert remove_tract(vit) == ["vit.embeddings.patch_embeddings.projection"]
    assert "forward" not in vit.vit.embeddings.patch_embeddings.projection.__dict__


def test_bad_inputs_are_one_clear_error():
    from hfpapers.engine import TrainingArguments
    from hfpapers.methods.tract import TractConfig

    normed = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"the first layer of Sequential is '0' \(LayerNorm\)"):
        apply_tract(normed)
    assert find_first_layer(normed)[0] == "0"
    assert apply_tract(normed, layer="1") == "1"  # the layer can be named
    for l in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a finite number above 0"):
            apply_tract(nn.Linear(2, 2), l)
    with pytest.raises(ValueError, match=r"tract \(TrAct's lambda\) must be a finite number above 0"):
        TrainingArguments(output_dir="unused", tract=0.0)
    with pytest.raises(ValueError, match="l \\(TrAct's lambda\\) must be a finite number above 0"):
        TractConfig(l=-1.0)


def test_engine_flag_takes_an_sgd_step_with_tracts_gradient(tmp_path):
    """`TrainingArguments(tract=l)`: one plain-SGD step of the engine moves the first layer by -lr x Eq. 10 on
    the batch (computed here from the untouched model), and the saved model is plain again."""
    from hfpapers.engine import ImageClassificationRecipe, TensorDataset, TrainingArguments, fit

    class Recipe(ImageClassificationRecipe):
        def prepare_dataset(self, dataset, processor):
            return dataset

        def build_optimizer(self, model, args):
            return torch.optim.SGD(model.parameters(), lr=args.learning_rate)

    torch.manual_seed(0)
    model = _tiny_vit()
    pixels, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    before = model.vit.embeddings.patch_embeddings.projection.weight.detach().clone()
    patches = F.unfold(pixels, 4, stride=4).transpose(1, 2).reshape(-1, 48)
    z = model.vit.embeddings.patch_embeddings.projection(pixels)
    z.retain_grad()
    patch_out = model.vit.embeddings.patch_embeddings.projection
    hook = patch_out.register_forward_hook(lambda module, args, out: z)  # the forward reuses z to read dL/dz
    model(pixel_values=pixels, labels=labels).loss.backward()
    hook.remove()
    expected_grad = _explicit(z.grad.movedim(1, -1).reshape(-1, 16), patches, 0.1).reshape(before.shape)
    model.zero_grad()
    data = TensorDataset(pixel_values=pixels, labels=labels)
    args = TrainingArguments(output_dir=str(tmp_path), num_epochs=1, per_device_train_batch_size=8,
                             learning_rate=0.5, tract=0.1, progress_bar=False)
    fit(model, {"train": data, "test": data}, Recipe(), args)
    torch.testing.assert_close(patch_out.weight.detach(), before - 0.5 * expected_grad, rtol=1e-4, atol=1e-6)
    assert "forward" not in patch_out.__dict__


def test_cli_flag_reaches_the_training_arguments():
    import argparse

    from hfpapers.cli import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert parser.parse_args(["scaling-mlp", "--output-dir", "o", "--tract"]).tract == 0.1
    assert parser.parse_args(["scaling-mlp", "--tract", "0.05", "--output-dir", "o"]).tract == 0.05
    assert parser.parse_args(["scaling-mlp", "--output-dir", "o"]).tract is None


def test_procedure_run_saves_the_plain_tract_model(tmp_path):
    """`hfpapers run tract` on a saved tiny Scaling MLP (1 epoch on 640 shapes): both arms train, the saved model is
    a plain checkpoint, and the curves and plot are written."""
    import json

    from transformers import AutoModelForImageClassification, ViTImageProcessor

    import hfpapers
    from hfpapers import data
    from hfpapers.runs import run

    kwargs = {"resolution": 16, "num_train": 640, "num_test": 200}
    names = data.load("shapes", **kwargs)["train"].features["label"].names
    folder = tmp_path / "classifier"
    hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=len(names),
                          id2label=dict(enumerate(names))).save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    result = run("tract", str(folder), str(tmp_path / "out"), dataset="shapes", dataset_kwargs=kwargs,
                 settings={"num_epochs": 1, "batch_size": 32, "optimizer": "adamw", "learning_rate": 1e-3})
    curves = result.details["curves"]
    assert result.details["layer"] == "mlp.linear_in" and len(curves["TrAct"]) == len(curves["baseline"]) == 1
    out = tmp_path / "out"
    assert (out / "accuracy.png").is_file()
    assert json.loads((out / "results.json").read_text())["metrics"]["accuracy"] == curves["TrAct"][0]
    saved = AutoModelForImageClassification.from_pretrained(out)
    assert "forward" not in saved.mlp.linear_in.__dict__


def test_trains_faster_than_plain_sgd_on_raw_pixels():
    """The claim in small, seeded: at equal epochs TrAct is ahead, most of all where the first layer's plain update
    depends on the input scale (paper Fig. 8: inputs in [0, 255], no standardisation). One epoch of SGD on sklearn's
    digits: plain training stays near chance (0.25 here), TrAct reaches 0.77."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) * (255 / 16), torch.tensor(digits.target)
    accuracy = {}
    for arm in ("TrAct", "plain"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        if arm == "TrAct":
            apply_tract(model, 0.1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for index in torch.randperm(1400, generator=torch.Generator().manual_seed(0)).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy[arm] = (model(x[1400:]).argmax(-1) == y[1400:]).float().mean().item()
    assert accuracy["TrAct"] > 0.7 and accuracy["TrAct"] > accuracy["plain"] + 0.3, accuracy
