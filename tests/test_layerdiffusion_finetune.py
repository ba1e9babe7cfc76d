"""LayerDiffuse end to end: the UNet fine-tuned on transparent latents, the captioned layers it learns from, and the
SD 1.5 joint / fg2bg / bg2fg layer pipeline."""

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import hfpapers
from hfpapers import data
from hfpapers.data.images import SHAPE_KINDS
from hfpapers.data.layers import COLOUR_WORDS, shape_coverage
from hfpapers.engine import TrainingArguments, TrainingState, fit
from hfpapers.methods.layerdiffusion import AttentionSharingAdapter, StableDiffusionLayersPipeline
from hfpapers.methods.layerdiffusion.finetune import (
    LayerDiffusionFinetuneRecipe,
    fitted_shape_iou,
    load_transparent_lora,
    shape_templates,
)
from hfpapers.registry import get_method
from hfpapers.testing.tiny_diffusion import tiny_sd15_parts

TINY = get_method("layerdiffusion").presets["tiny"].training
LAYERS = {"resolution": 32, "num_train": 32, "num_test": 16}


@pytest.fixture(scope="module")
def layers():
    return data.load("rgba_layers", **LAYERS)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A tiny transparent VAE (random, with a visible offset) saved as the fine-tuning's `transparent_vae`."""
    torch.manual_seed(0)
    model = hfpapers.create_model("layerdiffusion", "tiny").eval()
    for parameter in model.transparent_encoder.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return folder


def recipe_for(vae_folder, **settings) -> LayerDiffusionFinetuneRecipe:
    return LayerDiffusionFinetuneRecipe(**{"transparent_vae": str(vae_folder), "unet": TINY["unet"],
                                           "text_encoder": TINY["text_encoder"], "num_inference_steps": 2, **settings})


@pytest.fixture(scope="module")
def finetuned(vae_folder, layers, tmp_path_factory):
    """One short full fine-tune through the engine, and its folder."""
    folder = tmp_path_factory.mktemp("finetuned")
    recipe = recipe_for(vae_folder)
    args = TrainingArguments(output_dir=str(folder), num_epochs=1, per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, progress_bar=False, overwrite_output_dir=True)
    recipe.check_arguments(args)
    model, _ = recipe.build_model(get_method("layerdiffusion").resolve("tiny"), layers, args)
    result = fit(model, layers, recipe, args)
    return recipe, model, folder, result


# --- captioned layers ------------------------------------------------------------------------------------------

def test_captions_name_each_shape_and_the_colour_nearest_its_pixels(layers):
    """One-shape layers checked from their pixels alone: the colour word is the nearest palette colour to the
    alpha-weighted mean visible colour, and the named shape is the one whose rendered mask fits the alpha best."""
    checked = 0
    for image, caption in zip(layers["train"]["image"], layers["train"]["text"]):
        words = caption.split(" and ")
        assert all(w.split()[0] in COLOUR_WORDS and w.split()[1] in SHAPE_KINDS for w in words), caption
        rgba = np.asarray(image, dtype=np.float64) / 255
        if len(words) > 1 or rgba[..., 3].max() < 0.99:
            continue
        mean = (rgba[..., :3] * rgba[..., 3:]).sum((0, 1)) / rgba[..., 3].sum()
        palette = {name: np.linalg.norm(np.asarray(rgb) - mean) for name, rgb in COLOUR_WORDS.items()}
        assert words[0].split()[0] == min(palette, key=palette.get), caption
        checked += 1
    assert checked >= 3


def test_shifted_templates_equal_direct_renders():
    templates = shape_templates(32)
    radii = 32 * np.linspace(0.12, 0.35, 6)
    for kind_index, radius_index, cy, cx in ((0, 0, 1, 1), (2, 3, 5, 9), (9, 5, 31, 17)):
        direct = shape_coverage(SHAPE_KINDS[kind_index], 32, cx, cy, radii[radius_index]) > 0.5
        template = templates[kind_index, radius_index * 256 + (cy // 2) * 16 + cx // 2]
        assert torch.equal(template, torch.from_numpy(direct).flatten())


def test_fitted_shape_iou_by_hand():
    square = torch.zeros(1, 32, 32, dtype=torch.bool)
    square[0, 8:20, 8:20] = True
    iou = fitted_shape_iou(square)[0, SHAPE_KINDS.index("square")]
    # the best of the rendered squares, by a naive loop over every template
    templates = shape_templates(32)[SHAPE_KINDS.index("square")].float()
    flat = square.flatten().float()
    best = max(((t * flat).sum() / ((t + flat) > 0).sum()).item() for t in templates)
    assert iou.item() == pytest.approx(best) and best > 0.6


# --- fine-tuning -----------------------------------------------------------------------------------------------

def test_loss_is_the_noise_prediction_error_of_the_closed_form_forward_process(finetuned):
    recipe, model, _, _ = finetuned
    latents, ids = torch.randn(4, 4, 4, 4), model.tokenize(["red circle", "blue star", "", "grey ring"])
    batch = {"latents": latents, "input_ids": ids}
    loss = recipe.compute_loss(model, batch, torch.Generator().manual_seed(3), TrainingState())
    # the same draws by hand: noise, timesteps, dropped captions; SD's scaled-linear betas in closed form
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(1000, (4,), generator=g)
    dropped = torch.rand(4, generator=g) < recipe.caption_dropout
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float()[:, None, None, None]
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    ids = torch.where(dropped[:, None], model.tokenize([""]), ids)
    with torch.no_grad():
        context = model.text_encoder(ids)[0]
        expected = F.mse_loss(model.unet(noisy, t, encoder_hidden_states=context).sample, noise)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_only_the_unet_learns_and_the_training_latents_carry_the_offset(finetuned, layers):
    recipe, model, _, result = finetuned
    assert all(not p.requires_grad for p in model.transparent_vae.parameters())
    assert all(not p.requires_grad for p in model.text_encoder.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())
    dataset = recipe.prepare_dataset(layers["test"], None)
    rgba = dataset.tensors["rgba"][:2]
    vae = model.transparent_vae
    with torch.no_grad():
        posterior = vae.vae.encode((rgba[:, :3] * 2 - 1) * rgba[:, 3:]).latent_dist
        offset = vae.transparent_encoder(rgba).offset
    expected = (posterior.mean + posterior.std * offset) * vae.scaling_factor
    torch.testing.assert_close(dataset.tensors["latents"][:2], expected)
    assert set(result.eval_metrics) >= {"prompt_alpha_iou", "prompt_shape_accuracy", "alpha_iou", "identity_mse"}


def test_small_seeded_reproduction_check(finetuned, layers):
    """evaluation/reproduce/layerdiffusion_finetune.py at test size: against the same pipeline with a freshly
    initialised UNet (loaded from the fine-tuned folder), the fine-tuned UNet predicts the noise of the held-out
    layers' latents better at the same draws, and the baseline is measured on the same metrics."""
    from hfpapers.methods.layerdiffusion import TransparentLatentDiffusion

    recipe, model, folder, result = finetuned
    fresh = TransparentLatentDiffusion.from_pretrained(folder, fresh_unet_seed=0)
    untuned = LayerDiffusionFinetuneRecipe(num_inference_steps=2).evaluate(fresh, layers["test"])
    assert set(untuned) == set(result.eval_metrics)
    assert untuned["identity_mse"] == pytest.approx(result.eval_metrics["identity_mse"], rel=1e-5)
    batch = {k: v for k, v in recipe.prepare_dataset(layers["test"], None).tensors.items()}
    losses = [recipe.compute_loss(m, batch, torch.Generator().manual_seed(0), TrainingState()).item()
              for m in (model, fresh)]
    assert losses[0] < 0.9 * losses[1], losses


def test_lora_finetune_saves_a_merged_unet_and_an_adapter_that_only_fits_its_base(vae_folder, layers, tmp_path):
    from diffusers import UNet2DConditionModel

    recipe = recipe_for(vae_folder, lora_rank=4)
    args = TrainingArguments(output_dir=str(tmp_path / "lora"), num_epochs=1, per_device_train_batch_size=16,
                             learning_rate=1e-2, progress_bar=False)
    torch.manual_seed(0)
    model, _ = recipe.build_model(get_method("layerdiffusion").resolve("tiny"), layers, args)
    base = {k: v.clone() for k, v in model.unet.state_dict().items() if "lora" not in k}
    assert {n for n, p in model.unet.named_parameters() if p.requires_grad} == {
        n for n in dict(model.unet.named_parameters()) if ".lora_A." in n or ".lora_B." in n}
    fit(model, layers, recipe, args)
    tuned = [k for k, v in model.unet.state_dict().items() if "base_layer" in k]
    assert tuned and all(torch.equal(model.unet.state_dict()[k], base[k]) for k in base if k in model.unet.state_dict())
    # the saved UNet has the LoRA merged: W0 + B A at every projection
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "lora", subfolder="unet")
    for name, module in model.unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            expected = module.base_layer.weight + module.lora_B["default"].weight @ module.lora_A["default"].weight
            torch.testing.assert_close(merged.get_submodule(name).weight, expected)
    # the adapter alone on the same base gives the fine-tuned outputs ...
    base_unet = UNet2DConditionModel.from_config(model.unet.config)
    base_unet.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.unet.state_dict().items()
                               if "lora_" not in k})
    pipe = model.pipeline(base_unet)
    load_transparent_lora(pipe, tmp_path / "lora")
    sample, t, context = torch.randn(1, 4, 4, 4), torch.tensor([10]), torch.randn(1, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(sample, t, context).sample, merged(sample, t, context).sample,
                                   atol=1e-5, rtol=1e-5)
    # ... and on another base it is one error, before anything changes
    other = model.pipeline(UNet2DConditionModel(**{**TINY["unet"], "block_out_channels": [64, 128]}))
    with pytest.raises(ValueError, match="trained on another base: it does not fit this UNet at"):
        load_transparent_lora(other, tmp_path / "lora")
    assert not getattr(other.unet, "peft_config", None)


def test_bad_settings_and_captions_get_one_clear_error(finetuned, vae_folder):
    recipe, model, _, _ = finetuned
    args = TrainingArguments(output_dir="unused")
    with pytest.raises(ValueError, match=r"unknown vae_stage settings \['colour'\]"):
        recipe_for(vae_folder, vae_stage={"colour": 1}).check_arguments(args)
    with pytest.raises(ValueError, match="give base_pipeline"):
        LayerDiffusionFinetuneRecipe().check_arguments(args)
    with pytest.raises(ValueError, match="longer than the 64 tokens"):
        model.tokenize(["red circle and " * 8])
    with pytest.raises(ValueError, match="SD 1.5-style"):
        sdxl_like = {**TINY["unet"], "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                     "projection_class_embeddings_input_dim": 80}
        recipe_for(vae_folder, unet=sdxl_like).build_model(get_method("layerdiffusion").resolve("tiny"), None,
                                                           args)


# --- SD 1.5 layer pipelines ------------------------------------------------------------------------------------

def layer_pipeline(vae_folder, frames: int, control: bool) -> StableDiffusionLayersPipeline:
    from hfpapers.methods.layerdiffusion import TransparentVAE

    vae = TransparentVAE.from_pretrained(vae_folder)
    parts = tiny_sd15_parts()
    adapter = AttentionSharingAdapter.from_unet(parts["unet"], frames=frames, rank=4, use_control=control)
    torch.manual_seed(1)
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    pipe = StableDiffusionLayersPipeline(vae=vae.vae, transparent_decoder=vae.transparent_decoder,
                                         transparent_encoder=vae.transparent_encoder, attention_sharing=adapter,
                                         **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_joint_pipeline_gives_each_frame_its_prompt_and_decodes_only_the_foreground(vae_folder):
    pipe = layer_pipeline(vae_folder, 3, False)
    run = dict(num_inference_steps=2, height=64, width=64, output_type="pt", num_images_per_prompt=2)
    out = pipe("a cat", ["red", None, "blue"], generator=torch.Generator().manual_seed(0), **run)
    assert out.foreground.shape == (2, 4, 64, 64) and out.background.shape == out.blended.shape == (2, 3, 64, 64)
    # by hand: the rows (b f) with the frame prompts of Forge ("extra, prompt"), the adapter in the UNet
    texts = ["red, a cat", "a cat", "blue, a cat"]
    embeds, negative = pipe.encode_prompt(texts, "cpu", 1, True)
    latents = super(StableDiffusionLayersPipeline, pipe).__call__(
        prompt_embeds=embeds.repeat(2, 1, 1), negative_prompt_embeds=negative.repeat(2, 1, 1), height=64, width=64,
        num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        rgba = pipe.transparent_vae().decode(latents[0::3])
        background = (pipe.vae.decode(latents[1::3]).sample * 0.5 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out.foreground, rgba)
    torch.testing.assert_close(out.background, background)
    preview = out.previews[0]
    torch.testing.assert_close(preview, rgba[0, :3] * rgba[0, 3:] + 0.45 * (1 - rgba[0, 3:]))  # one 64 px cell
    images = pipe("a cat", num_inference_steps=2, height=64, width=64)
    assert images.foreground[0].mode == "RGBA" and images.background[0].mode == "RGB"
    with pytest.raises(ValueError, match="has 2 prompts for the 3 frames foreground, background, blended"):
        pipe("a cat", ["red", "blue"], num_inference_steps=2, height=64, width=64)


def test_fg2bg_and_bg2fg_read_the_condition_layer_over_grey(vae_folder):
    pipe = layer_pipeline(vae_folder, 2, True)
    g = torch.Generator().manual_seed(0)
    foreground = torch.rand(1, 4, 64, 64, generator=g)
    run = dict(num_inference_steps=2, height=64, width=64, output_type="pt")
    out = pipe("a room", foreground=foreground, generator=torch.Generator().manual_seed(0), **run)
    assert out.foreground is None and out.background.shape == out.blended.shape == (1, 3, 64, 64)
    # the control signals the UNet saw come from the foreground over mid-grey, by hand
    seen = {}
    handle = pipe.attention_sharing.kwargs_encoder.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    pipe("a room", foreground=foreground, **run)
    handle.remove()
    grey = 0.5 + (foreground[:, :3] - 0.5) * foreground[:, 3:]
    torch.testing.assert_close(seen["x"], grey * 2 - 1)
    background = PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    out = pipe("a cat", foreground=None, background=background, **run)
    assert out.foreground.shape == (1, 4, 64, 64) and out.background is None and out.previews.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="must have an alpha channel"):
        pipe("a room", foreground=background, **run)
    with pytest.raises(ValueError, match="the foreground is 32x32 pixels but the layers are 64x64"):
        pipe("a room", foreground=foreground[..., :32, :32], **run)
    with pytest.raises(ValueError, match="not both"):
        pipe("a room", foreground=foreground, background=background, **run)
    with pytest.raises(ValueError, match="frame_prompts has 3 prompts for the 2 frames background, blended"):
        pipe("a room", [None, None, None], foreground=foreground, **run)


def test_finetuned_and_layer_pipelines_saved_with_their_code_load_without_hfpapers(finetuned, vae_folder, tmp_path):
    """What fine-tuning saves, and a joint layer pipeline saved with `remote_code=True`, load through
    `DiffusionPipeline` in a Python where hfpapers cannot be imported, and generate what they do in-process."""
    from safetensors.torch import load_file
    from test_contract import run_without_hfpapers

    _, model, folder, _ = finetuned
    joint = layer_pipeline(vae_folder, 3, False)
    joint.save_pretrained(tmp_path / "joint", remote_code=True)
    unet_weights = load_file(tmp_path / "joint/unet/diffusion_pytorch_model.safetensors")
    assert not any("hookers" in k or "temporal" in k for k in unet_weights)  # the adapter is its own component
    code = (
        "import torch\n"
        "from diffusers import DiffusionPipeline\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe('red circle', num_inference_steps=2, output_type='pt',\n"
        "           generator=torch.Generator().manual_seed(0))\n"
        "print(type(pipe).__name__, out.images.shape[1], out.images.sum().item())\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'joint')!r}, trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe('a cat', ['red', None, None], num_inference_steps=2, height=64, width=64, output_type='pt',\n"
        "           generator=torch.Generator().manual_seed(0))\n"
        "print(type(pipe).__name__, out.foreground.sum().item(), out.blended.sum().item())\n"
    )
    tuned, layers = (line.split() for line in run_without_hfpapers(code, folder).splitlines())
    assert tuned[:2] == ["TransparentStableDiffusionPipeline", "4"]
    expected = model.pipeline()("red circle", num_inference_steps=2, output_type="pt",
                                generator=torch.Generator().manual_seed(0)).images
    assert float(tuned[2]) == pytest.approx(expected.sum().item(), rel=1e-5)
    expected = joint("a cat", ["red", None, None], num_inference_steps=2, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0))
    assert layers[0] == "StableDiffusionLayersPipeline"
    assert float(layers[1]) == pytest.approx(expected.foreground.sum().item(), rel=1e-5)
    assert float(layers[2]) == pytest.approx(expected.blended.sum().item(), rel=1e-5)
