"""CroCo: the mechanism against independent computations (closed forms, naive loops, hand-made examples), the
converter on a state dict with the official key names, the embedded view pairs, the pipeline and the dense head.

Parity with the official `CroCoNet` needs its code (CC BY-NC-SA, not vendored): it was run once from a scratch
folder (max abs difference 2.6e-6 at ViT-B / 224 px in float32, 2e-15 in float64, both position encodings)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hfpapers
from hfpapers.methods.croco import (CroCoConfig, CroCoForDepthEstimation, CroCoForPretraining, RotaryEmbedding2D,
                                    normalized_patch_mse, patchify, random_mask, sincos_position_embedding,
                                    standardize_depth, unpatchify)

TINY = hfpapers.get_method("croco").preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CroCoForPretraining(CroCoConfig(**TINY)).eval()


def test_sincos_embedding_is_mae_closed_form():
    """Width 8 on a 2x3 grid: the first half encodes the column, the second the row, [sin, sin, cos, cos] each with
    frequencies 1 and 10000^-1/2."""
    table = sincos_position_embedding(8, 2, 3)
    for y in range(2):
        for x in range(3):
            expected = [math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100),
                        math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)]
            torch.testing.assert_close(table[y * 3 + x], torch.tensor(expected, dtype=torch.float32))


def test_rope_rotates_each_pair_by_its_position_and_attends_by_offset():
    """Naive loop: pair (k, k + D/4) of the first half turns by y * base^(-2k / (D/2)), of the second half by x;
    hence q.k depends on the offset of two patches only."""
    head_dim, base = 8, 100.0
    rope = RotaryEmbedding2D(head_dim, base)
    positions = torch.tensor([[[2, 5], [0, 1], [3, 3]]])
    tokens = torch.randn(1, 1, 3, head_dim, dtype=torch.float64)
    rotated = RotaryEmbedding2D.rotate(tokens, *rope.cos_sin(positions, torch.float64))
    quarter = head_dim // 4
    for t in range(3):
        expected = tokens[0, 0, t].clone()
        for half, position in ((0, positions[0, t, 0]), (1, positions[0, t, 1])):
            for k in range(quarter):
                angle = float(position) * float(np.float32(1 / base ** (2 * k / (head_dim // 2))))
                i, j = half * 2 * quarter + k, half * 2 * quarter + k + quarter
                a, b = tokens[0, 0, t, i].item(), tokens[0, 0, t, j].item()
                expected[i] = a * math.cos(angle) - b * math.sin(angle)
                expected[j] = b * math.cos(angle) + a * math.sin(angle)
        torch.testing.assert_close(rotated[0, 0, t], expected, atol=1e-6, rtol=0)

    q, k = torch.randn(2, 1, 1, 1, head_dim, dtype=torch.float64)
    def score(pq, pk):
        rq = RotaryEmbedding2D.rotate(q, *rope.cos_sin(torch.tensor([[pq]]), torch.float64))
        rk = RotaryEmbedding2D.rotate(k, *rope.cos_sin(torch.tensor([[pk]]), torch.float64))
        return (rq * rk).sum().item()
    assert score([1, 2], [4, 0]) == pytest.approx(score([5, 7], [8, 5]), abs=1e-5)
    assert score([1, 2], [4, 0]) != pytest.approx(score([1, 2], [0, 4]), abs=1e-3)


def test_random_mask_is_the_official_draw_and_seedable():
    """int(0.9 * N) masked per row, drawn as `argsort(torch.rand) < n` from the global RNG in the official code."""
    mask = random_mask(3, 196, 176, torch.Generator().manual_seed(7))
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [176] * 3
    torch.manual_seed(7)
    assert torch.equal(mask, torch.rand(3, 196).argsort(1) < 176)
    assert torch.equal(mask, random_mask(3, 196, 176, torch.Generator().manual_seed(7)))
    assert not torch.equal(mask, random_mask(3, 196, 176, torch.Generator().manual_seed(8)))


def test_patchify_layout_and_loss_against_naive_loops():
    p, image = 2, torch.randn(2, 3, 4, 6, dtype=torch.float64)
    patches = patchify(image, p)
    for b in range(2):
        for r in range(2):
            for c in range(3):
                for i in range(p):
                    for j in range(p):
                        for ch in range(3):
                            assert patches[b, r * 3 + c, (i * p + j) * 3 + ch] == image[b, ch, r * p + i, c * p + j]
    assert torch.equal(unpatchify(patches, p, 4, 6), image)
    prediction = torch.randn_like(patches)
    mask = torch.tensor([[True, False, True, False, False, True], [False, True, True, False, False, True]])
    total, count = 0.0, 0
    for b in range(2):
        for n in range(6):
            if mask[b, n]:
                t = patches[b, n].tolist()
                mean = sum(t) / len(t)
                var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)  # unbiased, as the official loss
                total += sum((prediction[b, n, d].item() - (t[d] - mean) / math.sqrt(var + 1e-6)) ** 2
                             for d in range(len(t))) / len(t)
                count += 1
    assert normalized_patch_mse(prediction, patches, mask).item() == pytest.approx(total / count, rel=1e-12)


def test_the_masked_view_is_seen_only_through_its_visible_patches_and_the_reference_matters(model):
    """Changing view 1 under the mask leaves the prediction unchanged; changing a visible patch or view 2 does not."""
    g = torch.Generator().manual_seed(0)
    image, reference = torch.randn(2, 1, 3, 32, 32, generator=g)
    mask = random_mask(1, 64, model.config.num_masked, torch.Generator().manual_seed(1))
    pixel_mask = unpatchify(mask[..., None].expand(-1, -1, 48).float(), 4, 32, 32).bool()
    with torch.no_grad():
        base = model(image, reference, mask=mask).logits
        hidden_changed = model(torch.where(pixel_mask, torch.randn_like(image), image), reference, mask=mask).logits
        visible_changed = model(torch.where(pixel_mask, image, image + 1), reference, mask=mask).logits
        reference_changed = model(image, torch.randn_like(reference), mask=mask).logits
    torch.testing.assert_close(hidden_changed, base, atol=1e-6, rtol=0)
    assert (visible_changed - base).abs().max() > 1e-3 and (reference_changed - base).abs().max() > 1e-3


def test_eval_mask_is_seeded_and_training_masks_follow_the_generator(model):
    image, reference = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        out = model(image, reference)
    expected = random_mask(1, 64, model.config.num_masked, torch.Generator().manual_seed(0)).expand(3, -1)
    assert torch.equal(out.mask, expected)
    model.train()
    try:
        first = model(image, reference, generator=torch.Generator().manual_seed(3)).mask
        again = model(image, reference, generator=torch.Generator().manual_seed(3)).mask
    finally:
        model.eval()
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_mask_ratio_outside_the_open_interval_is_refused(ratio):
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises((ValueError, StrictDataclassError), match="mask_ratio must lie strictly between 0 and 1"):
        CroCoConfig(**{**TINY, "mask_ratio": ratio})


def test_explicit_masks_are_checked(model):
    image = torch.randn(2, 3, 32, 32)
    uneven = torch.zeros(2, 64, dtype=torch.bool)
    uneven[0, :10], uneven[1, :11] = True, True
    with pytest.raises(ValueError, match="same number of patches in every image"):
        model(image, image, mask=uneven)
    with pytest.raises(ValueError, match=r"bool tensor \(batch, patches\) = \(2, 64\)"):
        model(image, image, mask=torch.zeros(2, 63, dtype=torch.bool))


def test_converter_maps_a_hand_built_official_state_dict(tmp_path):
    """A `torch.save` envelope with the official key names (and v1's sin-cos tables) converts to the same model."""
    from hfpapers.methods.croco.convert_croco import convert, convert_checkpoint

    config = CroCoConfig(**{**TINY, "position_embedding": "cosine"})
    torch.manual_seed(1)
    ours = CroCoForPretraining(config).eval()
    renames = {"croco.": "", "decoder.embed.": "decoder_embed.", "decoder.blocks.": "dec_blocks.",
               "decoder.norm.": "dec_norm."}
    official = {}
    for key, tensor in ours.state_dict().items():
        new = next((theirs + key[len(mine):] for mine, theirs in renames.items() if key.startswith(mine)), key)
        official[new] = tensor.clone()
    assert {"patch_embed.proj.weight", "enc_blocks.0.attn.qkv.weight", "dec_blocks.1.cross_attn.projk.bias",
            "dec_blocks.0.norm_y.weight", "decoder_embed.weight", "mask_token", "prediction_head.bias"} <= set(official)
    official["enc_pos_embed"] = sincos_position_embedding(64, 8, 8)
    official["dec_pos_embed"] = sincos_position_embedding(64, 8, 8)
    kwargs = {"img_size": 32, "patch_size": 4, "enc_embed_dim": 64, "enc_depth": 2, "enc_num_heads": 4,
              "dec_embed_dim": 64, "dec_depth": 2, "dec_num_heads": 4, "pos_embed": "cosine"}
    torch.save({"model": official, "croco_kwargs": kwargs}, tmp_path / "croco.pth")
    report = convert(tmp_path / "croco.pth", tmp_path / "out")
    assert "non-commercial" in report
    loaded = CroCoForPretraining.from_pretrained(tmp_path / "out").eval()
    image, reference = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, reference).logits, ours(image, reference).logits, atol=0, rtol=0)

    official["enc_pos_embed"] = official["enc_pos_embed"] * 2
    torch.save({"model": official, "croco_kwargs": kwargs}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="enc_pos_embed .* is not the 8x8 sin-cos table"):
        convert_checkpoint(tmp_path / "bad.pth")
    del official["enc_pos_embed"], official["mask_token"]
    torch.save({"model": official, "croco_kwargs": {**kwargs, "pos_embed": "RoPE100"}}, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): mask_token.*unexpected keys \(1\): dec_pos_embed"):
        convert_checkpoint(tmp_path / "v2.pth")


def test_view_pairs_are_deterministic_and_their_flow_finds_the_same_colour():
    from hfpapers.data import load

    pairs = load("view_pairs", resolution=32, num_train=6, num_test=2)
    again = load("view_pairs", resolution=32, num_train=6, num_test=2, seed=0)
    assert np.array_equal(np.asarray(pairs["train"][3]["image"]), np.asarray(again["train"][3]["image"]))
    warped_error, still_error = [], []
    for row in pairs["train"]:
        one, two = (np.asarray(row[k], dtype=np.float64) for k in ("image", "reference"))
        depth, flow = np.asarray(row["depth"]), np.asarray(row["flow"])
        assert depth.shape == (32, 32) and flow.shape == (2, 32, 32) and (depth >= 2.0).all() and (depth <= 8.0).all()
        v, u = np.mgrid[0:32, 0:32]
        u2, v2 = np.floor(u + 0.5 + flow[0]).astype(int), np.floor(v + 0.5 + flow[1]).astype(int)
        inside = (u2 >= 0) & (u2 < 32) & (v2 >= 0) & (v2 < 32)
        warped_error.append(np.abs(one[inside] - two[v2[inside], u2[inside]]).mean())
        still_error.append(np.abs(one - two).mean())
    # occlusions and sub-pixel sampling leave some error; a wrong flow would be as bad as no flow at all
    assert np.mean(warped_error) < 0.5 * np.mean(still_error)


def test_depth_head_loss_is_mse_to_per_image_standardised_depth():
    torch.manual_seed(0)
    head = CroCoForDepthEstimation(CroCoConfig(**TINY)).eval()
    image, reference = torch.randn(2, 2, 3, 32, 32)
    labels = torch.rand(2, 32, 32) * 5 + 2
    with torch.no_grad():
        out = head(image, reference, labels=labels)
    flat = labels.numpy().reshape(2, -1).astype(np.float64)
    standard = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) + 1e-6)
    expected = ((out.predicted_depth.numpy().reshape(2, -1) - standard) ** 2).mean()
    assert out.predicted_depth.shape == (2, 32, 32)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(standardize_depth(labels).flatten(1).std(1, unbiased=False), torch.ones(2))


def test_pipeline_completes_the_masked_view_and_keeps_the_visible_patches(tmp_path, model):
    from transformers import pipeline

    from hfpapers.methods.croco.pipeline_croco import save_completion
    from hfpapers.methods.croco.recipe import build_image_processor

    model.save_pretrained(tmp_path / "m")
    build_image_processor(model.config).save_pretrained(tmp_path / "m")
    complete = pipeline("cross-view-completion", model=str(tmp_path / "m"))
    rng = np.random.default_rng(0)
    from PIL import Image

    image, reference = (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    result = complete(image, reference, mask_seed=5)
    mask = random_mask(1, 64, model.config.num_masked, torch.Generator().manual_seed(5)).view(8, 8).numpy()
    assert np.array_equal(result["mask"], mask) and result["loss"] > 0
    visible = ~np.kron(mask, np.ones((4, 4), dtype=bool))
    original, rebuilt = np.asarray(image, dtype=int), np.asarray(result["reconstruction"], dtype=int)
    assert np.abs(original[visible] - rebuilt[visible]).max() <= 1
    assert save_completion(result, tmp_path / "completion.png").size == (96, 32)


def test_a_local_dataset_of_image_pairs_trains_through_column_mapping(tmp_path):
    """Any dataset of pairs (Hub id or local folder) with its own column names: --column image=left etc."""
    from hfpapers.data import load
    from hfpapers.methods.croco.recipe import CroCoRecipe, build_image_processor

    pairs = load("view_pairs", resolution=32, num_train=4, num_test=2)
    for split, rows in pairs.items():
        rows.select_columns(["image", "reference"]).rename_columns({"image": "left", "reference": "right"}) \
            .to_parquet(tmp_path / f"{split}.parquet")
    recipe = CroCoRecipe()
    loaded = load(str(tmp_path), required=recipe.columns, columns={"image": "left", "reference": "right"})
    prepared = recipe.prepare_dataset(loaded["train"], build_image_processor(CroCoConfig(**TINY)))
    assert len(prepared) == 4 and prepared[0]["reference_pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"no column\(s\) \['reference'\]"):
        load(str(tmp_path), required=recipe.columns, columns={"image": "left"})


def test_optimizer_decays_matrices_but_not_biases_or_layer_norms(model):
    """As the official `get_parameter_groups`: weight decay on linear and convolution weights and the mask token,
    none on biases and LayerNorm weights."""
    from types import SimpleNamespace

    from hfpapers.methods.croco.recipe import CroCoRecipe

    optimizer = CroCoRecipe().build_optimizer(model, SimpleNamespace(learning_rate=1e-3, weight_decay=0.05))
    decay = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.05 for p in group["params"]}
    exempt = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.0 for p in group["params"]}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            expected = exempt if isinstance(module, torch.nn.LayerNorm) or name == "bias" else decay
            assert id(param) in expected, f"{module_name}.{name}"
    assert len(decay) + len(exempt) == len(list(model.parameters())) and id(model.mask_token) in decay


def test_single_view_arm_sees_nothing_of_the_reference(model):
    """The MAE arm of the reproduction: whatever view 2 is, its loss is the model's with a blank reference (zeros:
    the dataset mean), whose encoded tokens are all identical, so cross-attention carries no position or content."""
    from hfpapers.methods.croco.experiments import SingleViewRecipe

    image, first, second = torch.randn(3, 2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        losses = [SingleViewRecipe().eval_outputs(model, {"pixel_values": image, "reference_pixel_values": view})
                  ["loss"] for view in (first, second)]
        blank = model(image, torch.zeros_like(image)).loss
        memory = model.croco.encode(torch.zeros(1, 3, 32, 32))[0][0]
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    assert losses[0].mean().item() == pytest.approx(blank.item(), rel=1e-5)
    torch.testing.assert_close(memory, memory[:1].expand_as(memory), atol=1e-5, rtol=0)  # float rounding only


@pytest.fixture(scope="module")
def small_reproduction(tmp_path_factory):
    """evaluation/reproduce/croco.py in miniature: both arms pre-trained for 16 steps each, same masks."""
    from hfpapers.data import load
    from hfpapers.methods.croco.experiments import pretrain_arms

    pairs = load("view_pairs", resolution=32, num_train=256, num_test=32, seed=1)
    arms = pretrain_arms(pairs, TINY, tmp_path_factory.mktemp("croco-arms"), seed=0, num_epochs=1,
                         per_device_train_batch_size=16, learning_rate=2e-3, weight_decay=0.05)
    return pairs, arms


def test_seeded_small_reproduction_cross_view_completion_beats_single_view(small_reproduction):
    """The second view clearly helps (measured: 0.74 vs 0.97 normalised-patch loss)."""
    _, arms = small_reproduction
    assert arms["croco"]["loss"][-1] < 0.85 * arms["mae"]["loss"][-1]


def test_loss_by_displacement_against_a_loop_over_patches(small_reproduction):
    from hfpapers.methods.croco.experiments import loss_by_displacement
    from hfpapers.methods.croco.recipe import build_image_processor

    pairs, arms = small_reproduction
    folders = {arm: arms[arm]["folder"] for arm in ("croco", "mae")}
    got = loss_by_displacement(pairs, folders, bins=3)
    test = pairs["test"]
    for arm, folder in folders.items():
        model = CroCoForPretraining.from_pretrained(folder).eval()
        processor = build_image_processor(model.config)
        image = torch.as_tensor(processor([im.convert("RGB") for im in test["image"]], return_tensors="np")[
            "pixel_values"])
        reference = torch.as_tensor(processor([im.convert("RGB") for im in test["reference"]], return_tensors="np")[
            "pixel_values"])
        with torch.no_grad():
            out = model(pixel_values=image, reference_pixel_values=torch.zeros_like(reference) if arm == "mae"
                        else reference)
        sums, counts = [0.0] * 3, [0] * 3
        for i in range(len(test)):
            flow = np.array(test[i]["flow"])
            for j in torch.nonzero(out.mask[i]).flatten().tolist():
                row, col = divmod(j, 8)  # 32 px in patches of 4
                block = flow[:, 4 * row:4 * row + 4, 4 * col:4 * col + 4]
                displacement = math.hypot(block[0].mean(), block[1].mean())
                values = [float(image[i, c, 4 * row + y, 4 * col + x]) for y in range(4) for x in range(4)
                          for c in range(3)]  # (row, column, channel) order, as the prediction head
                mean = sum(values) / 48
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / 47 + 1e-6)
                error = sum((float(p) - (v - mean) / std) ** 2 for p, v in zip(out.logits[i, j], values)) / 48
                which = sum(displacement > edge for edge in got["edges"][1:-1])
                sums[which] += error
                counts[which] += 1
        assert min(counts) > 0 and abs(max(counts) - min(counts)) <= 1 + len(test) // 10  # quantile bins
        assert got[arm] == pytest.approx([s / c for s, c in zip(sums, counts)], rel=1e-4)
