"""Scaling MLPs: the B-MLP against a hand-written forward, the paper's parameter counts, the recipe's pieces."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hfpapers
from hfpapers.augment import random_resized_crop
from hfpapers.engine import TrainingState
from hfpapers.methods.scaling_mlp.recipe import Lion, ScalingMLPRecipe

# Published counts at 64x64x3 (official README and the issue), with a 10-class and the ImageNet-21k head.
PAPER_COUNTS = {
    "B_6-Wi_512": (18_901_514, 24_657_374),
    "B_12-Wi_512": (31_505_930, 37_261_790),
    "B_6-Wi_1024": (62_968_842, 74_469_342),
    "B_12-Wi_1024": (113_343_498, 124_843_998),
}


@pytest.mark.parametrize("preset", PAPER_COUNTS)
def test_paper_presets_have_the_published_parameter_counts(preset):
    ten, in21k = PAPER_COUNTS[preset]
    with torch.device("meta"):  # counting needs shapes, not memory
        assert sum(p.numel() for p in hfpapers.create_model("scaling-mlp", preset=preset).parameters()) == in21k
        assert sum(p.numel() for p in hfpapers.create_model("scaling-mlp", preset=preset, num_labels=10)
                   .parameters()) == ten


def naive_forward(state, x, num_blocks, eps=1e-5):
    """The paper's B-MLP written out with plain tensor ops from a state dict."""
    h = x.reshape(len(x), -1) @ state["mlp.linear_in.weight"].T + state["mlp.linear_in.bias"]
    for i in range(num_blocks):
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        normed = (h - mean) / torch.sqrt(var + eps) * state[f"mlp.layernorms.{i}.weight"] + state[f"mlp.layernorms.{i}.bias"]
        inner = normed @ state[f"mlp.blocks.{i}.block.0.weight"].T + state[f"mlp.blocks.{i}.block.0.bias"]
        inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))  # exact GELU
        h = h + inner @ state[f"mlp.blocks.{i}.block.2.weight"].T + state[f"mlp.blocks.{i}.block.2.bias"]
    return h @ state["linear_out.weight"].T + state["linear_out.bias"]


def test_forward_matches_hand_computation():
    torch.manual_seed(0)
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_blocks=3, num_labels=5).eval()
    with torch.no_grad():  # non-trivial norm parameters, so a wrong norm cannot hide
        for norm in model.mlp.layernorms:
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 16, 16)
    expected = naive_forward({k: v.double() for k, v in model.state_dict().items()}, x.double(), 3)
    torch.testing.assert_close(model(pixel_values=x).logits.double(), expected, atol=1e-5, rtol=1e-5)


def test_flattening_is_channels_height_width():
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_blocks=1, image_size=2, hidden_size=4).eval()
    x = torch.arange(12.0).reshape(1, 3, 2, 2)
    with torch.no_grad():
        model.mlp.linear_in.weight.zero_()
        model.mlp.linear_in.weight[0, 5] = 1.0  # reads element 5 of the flat vector = channel 1, row 0, col 1
        model.mlp.linear_in.bias.zero_()
        out = model.mlp(pixel_values=x, output_hidden_states=True).hidden_states[0]
    assert out[0, 0].item() == x[0, 1, 0, 1].item() == 5.0


def test_hidden_states_and_loss():
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=4)
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    out = model(pixel_values=x, labels=labels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_blocks + 1
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_loss_follows_problem_type_like_transformers_classifiers():
    """Integer labels -> softmax CE; float (batch, num_labels) targets -> per-class BCE; one label -> MSE."""
    x = torch.randn(3, 3, 16, 16)
    multi = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=4)
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    out = multi(pixel_values=x, labels=targets)
    p = out.logits.sigmoid()
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert multi.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(out.loss, bce)
    regression = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=1)
    values = torch.tensor([0.5, -1.0, 2.0])
    out = regression(pixel_values=x, labels=values)
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - values) ** 2).mean())
    regression.config.problem_type = "multi_label_classification"  # an explicit problem type wins over inference
    out = regression(pixel_values=x, labels=values[:, None].sigmoid())
    assert out.loss.grad_fn.name().startswith("BinaryCrossEntropyWithLogits")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_blocks=3, num_labels=4).train()
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    def gradients():
        model.zero_grad()
        model(pixel_values=x, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable()  # transformers v5's name of gradient_checkpointing_enable()
    assert model.is_activation_checkpointing and all(b.gradient_checkpointing for b in model.mlp.blocks)
    recomputed = []
    model.mlp.blocks[0].block[0].register_forward_hook(lambda *_: recomputed.append(1))
    checkpointed = gradients()
    assert len(recomputed) == 2  # the block ran again in the backward pass: it was checkpointed
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-6, msg=name)





def test_float64_and_float16_pixels_are_cast_to_the_model_dtype():
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=3).eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(pixel_values=x).logits
    for dtype in (torch.float64, torch.float16):
        got = model(pixel_values=x.to(dtype)).logits
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, model(pixel_values=x.to(dtype).float()).logits)
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


def test_classifier_without_classes_is_refused():
    with pytest.raises(Exception, match="num_labels must be at least 1.*got 0"):
        hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=0)


def test_image_processor_resizes_and_normalises_like_the_paper():
    from hfpapers.methods.scaling_mlp import ScalingMLPConfig
    from hfpapers.registry import create_processor

    processor = create_processor("scaling-mlp", ScalingMLPConfig(image_size=8))
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    got = processor(Image.fromarray(rgb), return_tensors="pt")["pixel_values"][0]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet, as the official code
    expected = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    grey = processor(Image.fromarray(rgb[..., 0]), return_tensors="pt")["pixel_values"]
    assert grey.shape == (1, 3, 8, 8)
    assert processor(Image.new("RGB", (30, 20)), return_tensors="pt")["pixel_values"].shape == (1, 3, 8, 8)


def overlap_average(image: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's INTER_AREA by its definition, one pixel at a time: a square (side, side, 3) array to (size, size, 3),
    where output pixel (i, k) covers the square [i s, (i + 1) s) x [k s, (k + 1) s), s = side / size, and each
    input pixel counts with the area of its overlap with that square."""
    side = image.shape[0]
    s = side / size
    out = np.zeros((size, size, image.shape[2]))
    for i in range(size):
        rows = np.arange(math.floor(i * s), min(side, math.ceil((i + 1) * s)))
        heights = np.minimum((i + 1) * s, rows + 1) - np.maximum(i * s, rows)
        for k in range(size):
            cols = np.arange(math.floor(k * s), min(side, math.ceil((k + 1) * s)))
            widths = np.minimum((k + 1) * s, cols + 1) - np.maximum(k * s, cols)
            areas = heights[:, None] * widths[None, :]  # overlap of each input pixel with the output pixel
            out[i, k] = (areas[..., None] * image[rows][:, cols]).sum((0, 1))
    return out / (s * s)


@pytest.mark.parametrize(("height", "width", "size"), [(375, 500, 64), (500, 375, 64), (37, 23, 16), (31, 17, 8),
                                                       (9, 12, 16)])
def test_image_processor_centre_crops_a_square_then_area_resizes(height, width, size):
    """The official test-time decoder (FFCV CenterCropRGBImageDecoder, ratio=1): the centred min(H, W) square,
    then OpenCV's INTER_AREA into uint8 (shrinking, and the two-tap overlap weights enlarging); not a stretch of the
    whole image, and not PIL's BOX filter (up to 3.7/255 off at 375 -> 64)."""
    from hfpapers.methods.scaling_mlp import ScalingMLPConfig
    from hfpapers.registry import create_processor

    processor = create_processor("scaling-mlp", ScalingMLPConfig(image_size=size))
    rgb = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    exact = overlap_average(rgb[top:top + side, left:left + side], size)
    got = processor(Image.fromarray(rgb), return_tensors="np", do_normalize=False, do_rescale=False)["pixel_values"]
    assert got.shape == (1, 3, size, size)
    got = got[0].transpose(1, 2, 0)
    not_a_tie = np.abs(exact % 1 - 0.5) > 1e-6  # rounded half up, as OpenCV; a float-level tie may go either way
    np.testing.assert_array_equal(got[not_a_tie], np.floor(exact + 0.5)[not_a_tie])
    assert np.abs(got - exact).max() <= 0.5 + 1e-6
    # Unrounded, on float pixels: the same weights to float precision.
    from hfpapers.methods.scaling_mlp.image_processing_scaling_mlp import area_resize

    square = rgb[top:top + side, left:left + side].astype(np.float64)
    np.testing.assert_allclose(area_resize(square.transpose(2, 0, 1), size, size).transpose(1, 2, 0), exact,
                               atol=1e-9)


def test_image_processor_area_resize_is_block_mean_for_integer_ratios():
    """48x80 -> the centred 48x48 square -> 8x8: each output pixel is the exact mean of a 6x6 block."""
    from hfpapers.methods.scaling_mlp import ScalingMLPConfig
    from hfpapers.registry import create_processor

    processor = create_processor("scaling-mlp", ScalingMLPConfig(image_size=8))
    rgb = np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    blocks = rgb[:, 16:64].reshape(8, 6, 8, 6, 3).astype(np.float64).mean((1, 3))
    got = processor(Image.fromarray(rgb), return_tensors="pt", do_normalize=False, do_rescale=False)["pixel_values"]
    assert np.abs(got[0].numpy().transpose(1, 2, 0) - np.round(blocks)).max() <= 1


def test_pipeline_uses_the_saved_area_processor_without_asking_about_remote_code(tmp_path, capsys):
    """The folder's processor is this method's class, found installed: `pipeline()` neither prompts for remote code
    (it also probes for a video processor, named after the image processor's `auto_map`) nor falls back to another
    processor."""
    from transformers import pipeline

    from hfpapers.methods.scaling_mlp.image_processing_scaling_mlp import ScalingMLPImageProcessor
    from hfpapers.registry import create_processor

    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=3).eval()
    model.save_pretrained(tmp_path)
    create_processor("scaling-mlp", model.config).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    assert type(classifier.image_processor) is ScalingMLPImageProcessor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8))
    scores = {r["label"]: r["score"] for r in classifier(image, top_k=3)}
    pixels = torch.from_numpy(classifier.image_processor(image, return_tensors="np")["pixel_values"])
    expected = model(pixel_values=pixels).logits.softmax(-1)[0]
    assert scores == pytest.approx({model.config.id2label[i]: expected[i].item() for i in range(3)}, abs=1e-6)
    assert "custom code" not in capsys.readouterr().out


def test_lion_matches_its_update_rule_by_hand():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    grads = [torch.randn(5) for _ in range(3)]
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    ref, m = p.detach().clone(), torch.zeros(5)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - 0.1 * 0.5)
        ref = ref - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), ref)


def test_mixup_loss_is_the_official_neighbour_blend():
    recipe = ScalingMLPRecipe(label_smoothing=0.3, mixup_alpha=0.8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                              horizontal_flip=False)
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=3).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    loss = recipe.compute_loss(model, {"pixel_values": x, "labels": y}, torch.Generator().manual_seed(7),
                               TrainingState())
    # The same draw of lambda, then the blend written out.
    gen = torch.Generator().manual_seed(7)
    torch.empty(4).uniform_(1, 1, generator=gen), torch.empty(4).uniform_(0, 0, generator=gen)
    torch.rand(4, generator=gen), torch.rand(4, generator=gen)
    lam = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen))).beta(0.8, 0.8)
    mixed = lam * x + (1 - lam) * x[[3, 0, 1, 2]]
    logits = model(pixel_values=mixed).logits

    def smoothed_ce(target):
        q = torch.full((4, 3), 0.3 / 3)
        q[torch.arange(4), target] += 0.7
        return -(q * logits.log_softmax(-1)).sum(-1).mean()

    expected = lam * smoothed_ce(y) + (1 - lam) * smoothed_ce(y[[3, 0, 1, 2]])
    torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-5)


def test_random_resized_crop_takes_the_requested_window():
    images = torch.arange(2 * 8 * 8.0).reshape(2, 1, 8, 8)
    whole = random_resized_crop(images, (1.0, 1.0), (1.0, 1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(whole, images)
    # A quarter-area square crop is a 4x4 window upsampled 2x: its mean lies in the window's value range.
    quarter = random_resized_crop(images, (0.25, 0.25), (1.0, 1.0), torch.Generator().manual_seed(1))
    for img, crop in zip(images, quarter):
        windows = img[0].unfold(0, 4, 1).unfold(1, 4, 1).reshape(-1, 16)
        assert (windows.mean(-1) - crop.mean()).abs().min() < 1.0


def test_wrong_input_shape_names_the_expected_shape():
    model = hfpapers.create_model("scaling-mlp", preset="tiny")
    with pytest.raises(ValueError, match=r"\(batch, 3, 16, 16\).*got \(2, 3, 32, 32\)"):
        model(pixel_values=torch.randn(2, 3, 32, 32))


def test_bad_config_values_are_rejected():
    with pytest.raises(Exception, match="norm_type must be one of"):
        hfpapers.create_model("scaling-mlp", preset="tiny", norm_type="group")


def test_saved_folder_loads_as_remote_code_without_hfpapers(tmp_path):
    """The saved folder carries its modeling files and auto_map: a user without hfpapers loads it."""
    from hfpapers.registry import create_processor

    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=3).eval()
    model.save_pretrained(tmp_path)
    create_processor("scaling-mlp", model.config).save_pretrained(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "expected.npy", model(pixel_values=x).logits.detach().numpy())
    code = f"""
import sys
sys.modules["hfpapers"] = None  # any import of hfpapers now fails
import numpy as np, torch
from transformers import AutoModelForImageClassification, AutoImageProcessor
try:
    AutoModelForImageClassification.from_pretrained({str(tmp_path)!r})
    raise SystemExit("loaded custom code without trust_remote_code")
except ValueError as error:
    assert "trust_remote_code" in str(error)
m = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
p = AutoImageProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
assert type(p).__module__.startswith("transformers_modules"), type(p).__module__
assert type(p).__name__ == "ScalingMLPImageProcessor" and p.size == {{"height": 16, "width": 16}}
x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))
got = m(pixel_values=x).logits.detach().numpy()
print(np.abs(got - np.load({str(tmp_path / 'expected.npy')!r})).max())
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) == 0.0
