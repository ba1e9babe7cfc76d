"""R-AMT (r-amt): binary masks on CLIP's image encoder and the gradient-dropout regulariser, each against an
independent computation (a masked weight built by hand, the official update rule worked out on small tensors)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel, pipeline

from hfpapers.methods.r_amt.adapters import MaskTunedCLIP, RAmtConfig, zero_shot_classifier
from hfpapers.methods.r_amt.recipe import GradientDropout, RAmtRecipe, gradient_dropout, tiny_clip_processor

THRESHOLD = 5e-3


@pytest.fixture(scope="module")
def processor():
    return tiny_clip_processor(32)


def tiny_clip(tokenizer, seed=0) -> CLIPModel:
    """3 vision blocks of width 64 (4 heads of 16), 32 px in patches of 8 (17 tokens)."""
    torch.manual_seed(seed)
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "intermediate_size": 128}
    text = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "max_position_embeddings": 16, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return CLIPModel(CLIPConfig(projection_dim=64, vision_config=vision, text_config=text)).eval()


def scramble_masks(model: MaskTunedCLIP, seed=1) -> None:
    """Real-valued masks spread around the threshold, so that about a third of the weights are removed."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.masked_layers().values():
        layer.mask_real.data = torch.rand(layer.mask_real.shape, generator=generator) * 1.5e-2


def test_training_starts_as_exact_zero_shot_clip(processor):
    clip = tiny_clip(processor.tokenizer)
    pixels = torch.randn(3, 3, 32, 32)
    text = processor.tokenizer(["a red circle", "a square"], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = clip(pixel_values=pixels, **text)
        model = MaskTunedCLIP(clip, RAmtConfig())
        for mode in (model.train, model.eval):
            mode()
            out = model(pixel_values=pixels, **text)
            assert torch.equal(out.logits_per_image, reference.logits_per_image)
            assert torch.equal(out.image_embeds, reference.image_embeds)
    # every vision block's q/k/v/out and the patch embedding, nothing else; only the masks train
    layers = model.masked_layers()
    assert len(layers) == 4 * 3 + 1 and all(".text_model." not in n for n in layers)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"base_model.{n}.mask_real" for n in layers}
    assert model.masked_fraction() == 0.0


def test_masked_attention_block_equals_its_weights_masked_by_hand(processor):
    clip = tiny_clip(processor.tokenizer)
    original = {k: v.clone() for k, v in clip.state_dict().items()}
    model = MaskTunedCLIP(clip, RAmtConfig(target_modules=("q_proj", "k_proj", "v_proj", "out_proj")))
    scramble_masks(model)
    hidden = torch.randn(2, 17, 64)
    prefix = "vision_model.encoder.layers.1.self_attn"
    masks = {p: model.masked_layers()[f"{prefix}.{p}"].mask_real.detach() for p in ("q_proj", "k_proj", "v_proj",
                                                                                    "out_proj")}

    def proj(name, x):
        weight = original[f"{prefix}.{name}.weight"] * (masks[name] > THRESHOLD).float()
        return x @ weight.T + original[f"{prefix}.{name}.bias"]

    def heads(x):
        return x.view(2, 17, 4, 16).transpose(1, 2)

    attention = torch.softmax(heads(proj("q_proj", hidden)) @ heads(proj("k_proj", hidden)).transpose(-1, -2) / 4.0,
                              dim=-1)
    expected = proj("out_proj", (attention @ heads(proj("v_proj", hidden))).transpose(1, 2).reshape(2, 17, 64))
    got = clip.vision_model.encoder.layers[1].self_attn(hidden)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert 0.2 < model.masked_fraction() < 0.45
    removed = sum(int((m <= THRESHOLD).sum()) for m in (layer.mask_real for layer in model.masked_layers().values()))
    assert model.masked_fraction() == removed / (3 * 4 * 64 * 64)


def test_straight_through_gradient_and_l2_penalty(processor):
    """dL/dM_real = dL/dW_eff * W (the binariser passes the gradient through); penalty = sum of the masks' norms."""
    clip = tiny_clip(processor.tokenizer)
    model = MaskTunedCLIP(clip, RAmtConfig(target_modules=("q_proj",)))
    scramble_masks(model)
    layer = model.masked_layers()["vision_model.encoder.layers.0.self_attn.q_proj"]
    x = torch.randn(5, 64)
    layer(x).square().sum().backward()
    effective = (layer.base_layer.weight * (layer.mask_real > THRESHOLD)).detach().requires_grad_()
    F.linear(x, effective, layer.base_layer.bias).square().sum().backward()
    torch.testing.assert_close(layer.mask_real.grad, effective.grad * layer.base_layer.weight)
    assert layer.base_layer.weight.grad is None
    expected = sum(math.sqrt(float((m.mask_real.detach().double() ** 2).sum())) for m in model.masked_layers().values())
    assert model.mask_penalty().item() == pytest.approx(expected, rel=1e-6)


def test_l2_penalty_takes_one_norm_of_each_fused_qkv_mask(processor):
    """The official attention masks its fused in_proj weight: one norm over a block's q, k and v masks together."""
    model = MaskTunedCLIP(tiny_clip(processor.tokenizer), RAmtConfig())
    scramble_masks(model)
    masks = {name: layer.mask_real.detach().double() for name, layer in model.masked_layers().items()}
    expected = math.sqrt(float((masks["vision_model.embeddings.patch_embedding"] ** 2).sum()))
    for block in range(3):
        prefix = f"vision_model.encoder.layers.{block}.self_attn."
        in_proj = torch.cat([masks[prefix + p] for p in ("q_proj", "k_proj", "v_proj")])  # (3 * 64, 64) as officially
        expected += math.sqrt(float((in_proj ** 2).sum())) + math.sqrt(float((masks[prefix + "out_proj"] ** 2).sum()))
    assert len(masks) == 1 + 3 * 4
    assert model.mask_penalty().item() == pytest.approx(expected, rel=1e-6)


def test_gradient_dropout_matches_the_official_rule_by_hand():
    g_ce = torch.tensor([0.2, -0.3, 0.5, -0.1, 0.0, 0.4])
    g_kl = torch.tensor([0.1, -0.1, -0.5, 0.3, 0.2, -1.2])
    uniform = torch.tensor([0.9, 0.5, 0.4, 0.1, 0.3, 0.3])
    # P = (sign(a)(a + b)/(|a| + |b| + eps) + 1)/2, worked out: agreeing signs 1; 0.5 vs -0.5: 1/2; -0.1 vs 0.3:
    # (-1 * 0.2 / 0.4 + 1)/2 = 1/4; a = 0: sign 0 -> 1/2; 0.4 vs -1.2: (-0.8/1.6 + 1)/2 = 1/4
    keep = torch.tensor([1.0, 1.0, 0.5, 0.25, 0.5, 0.25]) > uniform  # [T, T, T, T, T, F]
    for lam in (1.0, 0.3):
        expected = ((1 - lam) + lam * keep.float()) * g_ce
        torch.testing.assert_close(gradient_dropout(g_ce, g_kl, lam, uniform), expected)
    assert gradient_dropout(g_ce, g_kl, 1.0, uniform)[5] == 0.0 and gradient_dropout(g_ce, g_kl, 0.3, uniform)[5] \
        == pytest.approx(0.7 * 0.4)


class _Accelerator:  # what the recipe and the callback use of accelerate's Accelerator, one process
    num_processes = 1
    gradient_accumulation_steps = 1

    def backward(self, loss):
        loss.backward()

    def unwrap_model(self, model):
        return model


def test_one_r_amt_step_separates_the_two_gradients(processor):
    """The recipe's backward + the callback give ((1 - l) + l 1[P > U]) g_CE with g_CE (CE + L2 term) and g_KL
    (KL to the unmasked model) computed here on a copy with plain autograd."""
    clip = tiny_clip(processor.tokenizer)
    model = MaskTunedCLIP(clip, RAmtConfig(target_modules=("v_proj", "out_proj"))).train()
    model.set_classes(["circle", "square", "star"], processor.tokenizer, ["a {}"])
    scramble_masks(model, seed=3)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 0])}
    recipe = RAmtRecipe(gdr_lambda=0.5)
    masks = [p for p in model.parameters() if p.requires_grad]

    logits = model(pixel_values=batch["pixel_values"]).logits
    with torch.no_grad(), model.masks_disabled():
        teacher = model(pixel_values=batch["pixel_values"]).logits
    ce = F.cross_entropy(logits, batch["labels"]) + 1e-4 * sum(m.norm() for m in masks)
    kl = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(logits, -1))).sum(-1).mean()
    g_ce = torch.autograd.grad(ce, masks, retain_graph=True)
    g_kl = torch.autograd.grad(kl, masks)  # the KL differs from the official cross-entropy form by a constant

    dropout = recipe.callbacks()[1]
    assert isinstance(dropout, GradientDropout)
    torch.manual_seed(7)
    dropout.on_train_begin(None, model, _Accelerator())
    recipe.backward(_Accelerator(), model, batch, torch.Generator(), None)
    state = type("State", (), {"global_step": 0})()
    dropout.on_before_optimizer_step(state, model, _Accelerator())
    generator = torch.Generator().manual_seed(7 * 1_000_003)
    for mask, a, b in zip(masks, g_ce, g_kl):
        uniform = torch.rand(mask.shape, generator=generator)
        keep = (torch.sign(a) * (a + b) / (a.abs() + b.abs() + 1e-8) + 1) / 2 > uniform
        torch.testing.assert_close(mask.grad, (0.5 + 0.5 * keep.float()) * a, atol=1e-7, rtol=1e-5)
        assert 0 < (~keep).sum() < keep.numel()
    assert not dropout.kl_grads


def test_zero_shot_classifier_averages_template_embeddings(processor):
    clip = tiny_clip(processor.tokenizer)
    tokenizer = processor.tokenizer
    got = zero_shot_classifier(clip, tokenizer, ["Circle", "semicircle"], ["a photo of a {}", "a {}"])
    for row, name in zip(got, ["circle", "semicircle"]):
        embeds = []
        for prompt in (f"a photo of a {name}", f"a {name}"):
            ids = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                embeds.append(clip.get_text_features(**ids).pooler_output[0])
        mean = (embeds[0] + embeds[1]) / 2
        torch.testing.assert_close(row, mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_bit_packed_save_load_and_merge_into_a_plain_clip(processor, tmp_path):
    clip = tiny_clip(processor.tokenizer)
    model = MaskTunedCLIP(clip, RAmtConfig())
    scramble_masks(model)
    pixels = torch.randn(2, 3, 32, 32)
    text = processor.tokenizer(["a red circle", "a square"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        tuned = model(pixel_values=pixels, **text).logits_per_image
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    packed = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    name = "vision_model.encoder.layers.0.self_attn.k_proj"
    bits = (model.masked_layers()[name].mask_real > THRESHOLD).reshape(-1).numpy()
    assert packed[name].dtype == torch.uint8 and packed[name].numel() == 64 * 64 // 8
    # byte 0 holds weights 0..7, the first in the highest bit
    assert packed[name][0].item() == int("".join(str(int(b)) for b in bits[:8]), 2)
    assert packed["vision_model.embeddings.patch_embedding"].numel() == math.ceil(64 * 3 * 8 * 8 / 8)

    loaded = MaskTunedCLIP.from_pretrained(tmp_path / "adapter").eval()  # the base saved beside it (built here)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels, **text).logits_per_image, tuned)
    merged = loaded.merge()
    assert type(merged) is CLIPModel and not any(p.endswith("mask_real") for p in merged.state_dict())
    merged.save_pretrained(tmp_path / "merged")
    plain = CLIPModel.from_pretrained(tmp_path / "merged").eval()
    assert plain.state_dict().keys() == tiny_clip(processor.tokenizer).state_dict().keys()
    w = plain.vision_model.encoder.layers[0].self_attn.k_proj.weight
    assert torch.equal(w, clip.vision_model.encoder.layers[0].self_attn.k_proj.base_layer.weight * torch.from_numpy(
        bits.reshape(64, 64)))
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=pixels, **text).logits_per_image, tuned, atol=1e-5, rtol=1e-5)


def test_the_zero_shot_pipeline_runs_on_the_tuned_and_the_merged_model(processor, tmp_path):
    clip = tiny_clip(processor.tokenizer)
    model = MaskTunedCLIP(clip, RAmtConfig())
    scramble_masks(model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    labels = ["circle", "square", "star"]
    tuned = pipeline("zero-shot-image-classification", model=model.base_model, tokenizer=processor.tokenizer,
                     image_processor=processor.image_processor)(image, candidate_labels=labels,
                                                                hypothesis_template="a {}")
    model.merge().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    merged = pipeline("zero-shot-image-classification", model=str(tmp_path))(image, candidate_labels=labels,
                                                                             hypothesis_template="a {}")
    assert [r["label"] for r in tuned] == [r["label"] for r in merged]
    assert [r["score"] for r in tuned] == pytest.approx([r["score"] for r in merged], abs=1e-5)
    model.eval()
    with torch.no_grad():  # the pipeline's scores are the adapter's own class probabilities
        model.set_classes(labels, processor.tokenizer, ["a {}"])
        own = model(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"]).logits.softmax(-1)[0]
    assert sorted(own.tolist(), reverse=True) == pytest.approx([r["score"] for r in tuned], abs=1e-5)


def test_a_vision_only_clip_is_masked_and_merged():
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = vision(pixel_values=pixels).pooler_output
        model = MaskTunedCLIP(vision, RAmtConfig(target_modules=("q_proj", "fc1")))
        assert torch.equal(model(pixel_values=pixels).pooler_output, reference)
        assert len(model.masked_layers()) == 4 and type(model.merge()) is CLIPVisionModel


@pytest.mark.parametrize(("build", "message"), [
    (lambda tok: MaskTunedCLIP(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32, image_size=16, patch_size=8)), RAmtConfig()),
     "expected a transformers CLIPModel or CLIPVisionModel"),
    (lambda tok: RAmtConfig(target_modules=("q_proj", "query")), r"got unknown \['query'\]"),
    (lambda tok: RAmtConfig(mask_scale=1e-2, threshold=2e-2), "threshold must satisfy 0 <= threshold < mask_scale"),
    (lambda tok: zero_shot_classifier(tiny_clip(tok), tok, ["circle", "!?"], ["a {}"]),
     "class name '!\\?' tokenizes to nothing"),
    (lambda tok: zero_shot_classifier(tiny_clip(tok), tok, ["circle", ""], ["a {}"]), "class name '' tokenizes"),
])
def test_bad_input_is_one_clear_error(processor, build, message):
    with pytest.raises(ValueError, match=message):
        build(processor.tokenizer)


def test_few_shot_tuning_through_the_engine_saves_a_reloadable_adapter(processor, tmp_path):
    """A seeded R-AMT run through `fit` (recipe backward + gradient-dropout callback): masks cross the threshold,
    the masked fraction is logged each epoch, and the saved folder (bit-packed masks + the base beside them) gives
    the trained model's logits back."""
    from hfpapers import data
    from hfpapers.engine import TrainingArguments, fit

    datasets = data.load("captioned_shapes", required=("image", "label"), seed=0, resolution=32, num_train=32,
                         num_test=16, label="colour", colour_jitter=60)
    assert datasets["train"]["label"][:9] == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    model = MaskTunedCLIP(tiny_clip(processor.tokenizer), RAmtConfig())
    templates = ("a {} circle", "a {} square")
    model.set_classes(datasets["train"].features["label"].names, processor.tokenizer, templates)
    result = fit(model, datasets, RAmtRecipe(templates=templates), TrainingArguments(
        output_dir=str(tmp_path), num_epochs=2, per_device_train_batch_size=16, learning_rate=1e-2,
        lr_scheduler="cosine", progress_bar=False, seed=0), processor)
    fractions = [r["eval_masked_fraction"] for r in result.history if "eval_masked_fraction" in r]
    assert len(fractions) == 2 and 0 < fractions[-1] < 0.9 and fractions[-1] == model.masked_fraction()
    loaded = MaskTunedCLIP.from_pretrained(tmp_path).eval()
    loaded.set_classes(datasets["train"].features["label"].names, processor.tokenizer, templates)
    pixels = processor(images=list(datasets["test"]["image"]), return_tensors="pt")["pixel_values"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_the_paper_preset_masks_clip_vit_b16_as_the_official_code():
    """openai/clip-vit-base-patch16 has 149,620,737 parameters; the official targets (fused QKV + out_proj of 12
    blocks, conv1) hold 12 * 4 * 768^2 + 768 * 3 * 16^2 = 28,901,376 weights: 3.6 MB of masks at one bit each."""
    import hfpapers

    with torch.device("meta"):
        model = hfpapers.create_model("r-amt", preset="vit-b16")
    layers = model.masked_layers()
    masked = sum(layer.mask_real.numel() for layer in layers.values())
    assert sum(p.numel() for p in model.parameters()) - masked == 149_620_737
    assert len(layers) == 49 and masked == 12 * 4 * 768 ** 2 + 768 * 3 * 16 ** 2 == 28_901_376
