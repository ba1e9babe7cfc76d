"""LayerDiffuse latent transparency: encoder, decoder, TransparentVAE, pipelines, training."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import hfpapers
from hfpapers import data
from hfpapers.engine import TrainingState
from hfpapers.methods.layerdiffusion import (
    LatentTransparencyEncoder,
    TransparentStableDiffusionImg2ImgPipeline,
    TransparentStableDiffusionPipeline,
    TransparentStableDiffusionXLImg2ImgPipeline,
    TransparentStableDiffusionXLPipeline,
    TransparentVAE,
    TransparentVAEDecoder,
    pad_rgb,
)
from hfpapers.methods.layerdiffusion.modeling_layerdiffusion import _area_resize
from hfpapers.testing.tiny_diffusion import tiny_sd15_parts, tiny_sdxl_parts


@pytest.fixture(scope="module")
def tiny_vae() -> TransparentVAE:
    torch.manual_seed(0)
    model = hfpapers.create_model("layerdiffusion", "tiny").eval()
    for parameter in model.transparent_encoder.parameters():  # a non-zero offset, so that it is visible
        torch.nn.init.normal_(parameter, std=0.05)
    return model


def random_rgba(batch=2, height=64, width=64, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rgba = torch.rand(batch, 4, height, width, generator=generator)
    rgba[:, 3] = (rgba[:, 3] > 0.5).float() * rgba[:, 3]  # some fully transparent pixels
    return rgba


# --- architectures ------------------------------------------------------------------------------------------

def test_released_sizes():
    encoder = LatentTransparencyEncoder()
    assert sum(p.numel() for p in encoder.parameters()) == 1_181_764  # the released encoder
    assert [k for k in encoder.state_dict()][::2] == [f"blocks.{i}.weight" for i in range(0, 17, 2)]
    decoder = TransparentVAEDecoder()
    # the released UNet1024: 104.1M parameters in 538 tensors, loaded with strict=True by the official code
    assert len(decoder.state_dict()) == 538
    assert round(sum(p.numel() for p in decoder.parameters()) / 1e5) == 1041


def test_encoder_parameter_count_in_closed_form():
    channels = (8, 16, 24)
    encoder = LatentTransparencyEncoder(block_out_channels=channels, latent_channels=4)
    conv = lambda i, o: i * o * 9 + o  # noqa: E731
    expected, previous = 0, 4
    for c in channels:
        expected += conv(previous, c) + conv(c, c)
        previous = c
    expected += conv(previous, 4)
    assert sum(p.numel() for p in encoder.parameters()) == expected
    assert encoder(torch.rand(1, 4, 32, 32)).offset.shape == (1, 4, 8, 8)


def test_untrained_parts_start_neutral():
    """The offset's last conv and the decoder's latent input are zero-initialised, as the official code."""
    encoder = LatentTransparencyEncoder(block_out_channels=(8, 8, 8, 8))
    assert torch.equal(encoder(torch.rand(2, 4, 16, 16)).offset, torch.zeros(2, 4, 2, 2))
    decoder = TransparentVAEDecoder(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4)
    pixel = torch.rand(1, 3, 16, 16)
    assert torch.equal(decoder(pixel, torch.randn(1, 4, 2, 2)).sample, decoder(pixel, torch.zeros(1, 4, 2, 2)).sample)


# --- padded RGB ------------------------------------------------------------------------------------------------

def test_area_resize_matches_average_pooling_and_a_hand_example():
    image = torch.rand(1, 1, 12, 8, dtype=torch.float64)
    assert torch.allclose(_area_resize(image, 6, 4), F.avg_pool2d(image, 2))
    row = torch.tensor([[[[1.0, 2.0, 4.0]]]], dtype=torch.float64)
    # 3 -> 2 pixels: each output covers 1.5 inputs: (1 + 0.5*2) / 1.5 and (0.5*2 + 4) / 1.5
    assert torch.allclose(_area_resize(row, 1, 2), torch.tensor([[[[2 / 1.5, 5 / 1.5]]]], dtype=torch.float64))


def test_pad_rgb_keeps_visible_colour_and_ignores_hidden_colour():
    rgba = random_rgba(height=40, width=56).double()
    rgba[:, 3][rgba[:, 3] > 0.9] = 1.0
    padded = pad_rgb(rgba)
    opaque = (rgba[:, 3:] == 1).expand(-1, 3, -1, -1)
    assert torch.allclose(padded[opaque], rgba[:, :3][opaque])
    changed = rgba.clone()
    changed[:, :3] = torch.where(rgba[:, 3:] == 0, torch.rand_like(rgba[:, :3]), rgba[:, :3])
    assert torch.allclose(pad_rgb(changed), padded)  # what cannot be seen does not matter


def test_pad_rgb_fills_a_single_colour_everywhere():
    rgba = torch.zeros(1, 4, 33, 47, dtype=torch.float64)
    colour = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)[:, None, None]
    rgba[0, :3] = torch.rand(3, 33, 47)  # hidden junk
    rgba[0, :3, 10:20, 5:9] = colour
    rgba[0, 3, 10:20, 5:9] = 1
    assert torch.allclose(pad_rgb(rgba)[0], colour.expand(3, 33, 47))


# --- TransparentVAE --------------------------------------------------------------------------------------------

def test_offset_injection_is_mean_plus_std_times_offset(tiny_vae):
    rgba = random_rgba()
    with torch.no_grad():
        posterior = tiny_vae.vae.encode((rgba[:, :3] * 2 - 1) * rgba[:, 3:]).latent_dist
        offset = tiny_vae.transparent_encoder(rgba).offset
        expected = (posterior.mean + posterior.std * offset) * tiny_vae.vae.config.scaling_factor
        assert offset.abs().max() > 0
        assert torch.allclose(tiny_vae.encode(rgba), expected, atol=1e-6)


def test_decoder_channel_order_is_alpha_first(tiny_vae):
    decoder = TransparentVAEDecoder.from_config(tiny_vae.transparent_decoder.config)
    torch.nn.init.zeros_(decoder.conv_out.weight)
    decoder.conv_out.bias.data = torch.tensor([0.9, 0.1, 0.2, 0.3])  # alpha, R, G, B
    model = TransparentVAE(tiny_vae.vae, decoder, tiny_vae.transparent_encoder)
    with torch.no_grad():
        rgba = model.decode(torch.randn(1, 4, 8, 8))
    assert torch.allclose(rgba[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3, 0.9]))


def test_augmented_decoding_is_the_median_of_eight_transformed_passes(tiny_vae):
    decoder = tiny_vae.transparent_decoder
    for parameter in decoder.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    pixel, latent = torch.rand(1, 3, 64, 128), torch.randn(1, 4, 8, 16)
    passes = []
    with torch.no_grad():
        for flip in (False, True):
            for k in range(4):  # the official loop, one pass at a time
                p, z = (torch.flip(x, dims=(3,)) if flip else x for x in (pixel, latent))
                rotated = decoder(torch.rot90(p, k, (2, 3)), torch.rot90(z, k, (2, 3))).sample
                out = torch.rot90(rotated.clip(0, 1), -k, (2, 3))
                passes.append(torch.flip(out, dims=(3,)) if flip else out)
        expected = torch.stack(passes).median(dim=0).values
        for passes_per_batch in (1, 3, 8):
            got = decoder.estimate(pixel, latent, augment=True, passes_per_batch=passes_per_batch)
            assert torch.allclose(got, expected, atol=1e-5)


def test_bad_inputs_get_clear_errors(tiny_vae):
    with pytest.raises(ValueError, match="multiples of 64"):
        TransparentVAEDecoder()(torch.rand(1, 3, 96, 64), torch.randn(1, 4, 12, 8))
    with pytest.raises(ValueError, match="RGBA"):
        tiny_vae.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="another VAE"):
        tiny_vae.decode(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="passes_per_batch"):
        tiny_vae.decode(torch.randn(1, 4, 8, 8), augment=True, passes_per_batch=9)


def test_save_and_load_round_trip(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_index.json", "modeling_layerdiffusion.py", "pipeline_layerdiffusion.py", "transparent_decoder",
        "transparent_encoder", "vae"]
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))
    loaded = TransparentVAE.from_pretrained(tmp_path)
    rgba = random_rgba()
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(rgba)), tiny_vae.decode(tiny_vae.encode(rgba)))


# --- pipelines ---------------------------------------------------------------------------------------------------

def sd15_pipeline(tiny_vae):
    return TransparentStableDiffusionPipeline(vae=tiny_vae.vae, transparent_decoder=tiny_vae.transparent_decoder,
                                              transparent_encoder=tiny_vae.transparent_encoder, **tiny_sd15_parts())


def test_sd15_text_to_image_returns_rgba_of_the_requested_size(tiny_vae, tmp_path):
    pipe = sd15_pipeline(tiny_vae)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cat", height=64, width=128, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    image, preview = out.images[0], out.previews[0]
    assert image.mode == "RGBA" and image.size == (128, 64) and preview.mode == "RGB" and preview.size == (128, 64)
    # the preview is the RGBA over the grey checkerboard
    rgba = np.asarray(image, dtype=np.float64) / 255
    board = np.where((np.arange(64)[:, None] // 64 + np.arange(128)[None, :] // 64) % 2, 0.55, 0.45)[..., None]
    expected = rgba[..., :3] * rgba[..., 3:] + board * (1 - rgba[..., 3:])
    assert np.abs(np.asarray(preview, dtype=np.float64) / 255 - expected).max() <= 2 / 255
    arrays = pipe("a red cat", height=64, width=64, num_inference_steps=2, output_type="np").images
    assert arrays.shape == (1, 64, 64, 4) and 0 <= arrays.min() and arrays.max() <= 1
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("a red cat", height=60, width=64, num_inference_steps=2)

    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = TransparentStableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded("a red cat", height=64, width=128, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(image))
    assert TransparentVAE.from_pretrained(tmp_path / "pipe").transparent_encoder is not None


def test_trained_folder_and_pipeline_load_where_hfpapers_cannot_be_imported(tiny_vae, tmp_path):
    """A `TransparentVAE` folder (what `hfpapers train` and the zoo save) is a diffusers folder with its code, and so is
    a pipeline saved with `remote_code=True`: without hfpapers both load through `DiffusionPipeline` and give the
    in-process model's outputs bit for bit."""
    from safetensors.torch import load_file, save_file

    tiny_vae.save_pretrained(tmp_path / "trained")
    pipe = sd15_pipeline(tiny_vae)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe", remote_code=True)
    torch.manual_seed(0)
    inputs = {"rgba": random_rgba(batch=2, height=32, width=64), "latents": torch.randn(1, 4, 8, 8)}
    save_file(inputs, tmp_path / "inputs.safetensors")
    code = (
        "import sys; sys.modules['hfpapers'] = None\n"  # any import of hfpapers now fails
        "import torch\n"
        "from diffusers import DiffusionPipeline\n"
        "from safetensors.torch import load_file, save_file\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"  # the same reduction order as in this process
        f"inputs = load_file({str(tmp_path / 'inputs.safetensors')!r})\n"
        f"vae = DiffusionPipeline.from_pretrained({str(tmp_path / 'trained')!r}, trust_remote_code=True)\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r}, trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "outputs = {'round_trip': vae(image=inputs['rgba'], output_type='pt').images,\n"
        "           'decoded': vae(latents=inputs['latents'], output_type='pt').images,\n"
        "           'generated': pipe('a red cat', height=64, width=64, num_inference_steps=2, output_type='pt',\n"
        "                             generator=torch.Generator().manual_seed(0)).images}\n"
        f"save_file({{k: v.contiguous() for k, v in outputs.items()}}, {str(tmp_path / 'outputs.safetensors')!r})\n"
        "print(*(f'{type(p).__name__}:{type(p).__module__}' for p in (vae, vae.transparent_decoder, pipe)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the classes are the folders' copies of the code, run as remote code
    assert proc.stdout.split() == ["TransparentVAEPipeline:diffusers_modules.local.pipeline_layerdiffusion",
                                   "TransparentVAEDecoder:diffusers_modules.local.modeling_layerdiffusion",
                                   "TransparentStableDiffusionPipeline:diffusers_modules.local.pipeline_layerdiffusion"]
    outputs = load_file(tmp_path / "outputs.safetensors")
    with torch.no_grad():
        assert torch.equal(outputs["round_trip"], tiny_vae.decode(tiny_vae.encode(inputs["rgba"])))
        assert torch.equal(outputs["decoded"], tiny_vae.decode(inputs["latents"]))
    generated = pipe("a red cat", height=64, width=64, num_inference_steps=2, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(outputs["generated"], generated)


def test_a_pipeline_saved_plainly_loads_through_diffusion_pipeline(tiny_vae, tmp_path):
    """`DiffusionPipeline` finds a pipeline class by its name among diffusers' attributes: importing hfpapers adds
    the transparent pipelines there, and their components load by the module path saved with them."""
    from diffusers import DiffusionPipeline

    pipe = sd15_pipeline(tiny_vae)
    pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.py"))  # no code was copied: this folder needs hfpapers
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is TransparentStableDiffusionPipeline
    assert type(loaded.transparent_encoder) is LatentTransparencyEncoder
    outputs = []
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
        outputs.append(p("a red cat", height=64, width=64, num_inference_steps=2, output_type="pt",
                         generator=torch.Generator().manual_seed(0)).images)
    assert torch.equal(*outputs)


def test_the_vae_pipeline_takes_an_image_or_latents(tiny_vae):
    from hfpapers.methods.layerdiffusion import TransparentVAEPipeline

    pipe = TransparentVAEPipeline(tiny_vae.vae, tiny_vae.transparent_decoder, tiny_vae.transparent_encoder)
    with pytest.raises(ValueError, match="either an RGBA `image`.* not both"):
        pipe(image=random_rgba(batch=1), latents=torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="not neither"):
        pipe()
    image = pipe(latents=torch.randn(1, 4, 8, 16)).images[0]
    assert image.mode == "RGBA" and image.size == (128, 64)


def _fake_run_files(folder, num_parameters: int) -> None:
    """The two files `hfpapers train` writes next to the model, which a card is rendered from."""
    from hfpapers.engine import RESULTS_FILE, RUN_FILE

    (folder / RUN_FILE).write_text(json.dumps({
        "method": "layerdiffusion", "preset": "tiny", "dataset": "rgba_layers", "dataset_kwargs": {},
        "columns": {}, "training_arguments": {"num_epochs": 1}, "recipe": {}, "num_processes": 1}))
    (folder / RESULTS_FILE).write_text(json.dumps({
        "train_seconds": 1.0, "eval": {"alpha_iou": 0.5}, "num_parameters": num_parameters}))


def test_card_task_is_image_to_image_for_the_vae_and_text_to_image_for_a_pipeline(tiny_vae, tmp_path):
    from huggingface_hub import ModelCard

    from hfpapers.cards import write_card

    tiny_vae.save_pretrained(tmp_path / "vae")
    sd15_pipeline(tiny_vae).save_pretrained(tmp_path / "pipe")
    for folder, task in (("vae", "image-to-image"), ("pipe", "text-to-image")):
        _fake_run_files(tmp_path / folder, num_parameters=1)
        card = ModelCard.load(write_card(tmp_path / folder))
        assert card.data.pipeline_tag == task, folder
        assert card.data.eval_results[0].task_type == task, folder
        assert "text-to-image" not in card.data.tags


def test_sd15_image_to_image_keeps_size_and_needs_alpha(tiny_vae):
    pipe = TransparentStableDiffusionImg2ImgPipeline(**sd15_pipeline(tiny_vae).components)
    pipe.set_progress_bar_config(disable=True)
    source = PIL.Image.new("RGBA", (64, 128), (200, 30, 30, 0))
    source.paste((200, 30, 30, 255), (16, 16, 48, 100))
    out = pipe("a red box", image=source, strength=0.5, num_inference_steps=4)
    assert out.images[0].mode == "RGBA" and out.images[0].size == (64, 128)
    with pytest.raises(ValueError, match="not RGBA"):
        pipe("a red box", image=source.convert("RGB"), strength=0.5, num_inference_steps=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("a red box", image=source.crop((0, 0, 60, 64)), strength=0.5, num_inference_steps=4)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):  # 0-255 floats are refused, not clipped
        pipe("a red box", image=random_rgba(batch=1) * 255, strength=0.5, num_inference_steps=4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe("a red box", image=torch.full((1, 4, 64, 64), float("nan")), strength=0.5, num_inference_steps=4)


def test_sdxl_text_to_image_and_image_to_image(tiny_vae):
    pipe = TransparentStableDiffusionXLPipeline(vae=tiny_vae.vae, transparent_decoder=tiny_vae.transparent_decoder,
                                                transparent_encoder=tiny_vae.transparent_encoder, **tiny_sdxl_parts())
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cat", height=64, width=64, num_inference_steps=2, augment=True, passes_per_batch=4)
    assert out.images[0].mode == "RGBA" and out.images[0].size == (64, 64)
    img2img = TransparentStableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    again = img2img("a red cat", image=out.images[0], strength=0.5, num_inference_steps=4, output_type="pt")
    assert again.images.shape == (1, 4, 64, 64)


# --- training ------------------------------------------------------------------------------------------------------

def test_loss_terms_match_a_hand_computation():
    from hfpapers.methods.layerdiffusion.modeling_layerdiffusion import TransparentVAEOutput
    from hfpapers.methods.layerdiffusion.recipe import LayerDiffusionRecipe, alpha_metrics

    rgba = torch.zeros(1, 4, 8, 8)
    rgba[0, :, :4] = torch.tensor([1.0, 0.0, 0.0, 1.0])[:, None, None]  # the top half opaque red
    output = TransparentVAEOutput(rgba=torch.full((1, 4, 8, 8), 0.5), pixel=torch.zeros(1, 3, 8, 8), latent=None)
    terms = LayerDiffusionRecipe().losses(output, rgba)
    # alpha: 0.25 everywhere; colour: the padded RGB is red everywhere -> (0.25 + 0.25 + 0.25) / 3
    assert terms["reconstruction"].item() == pytest.approx(0.25 + 0.25)
    # identity: premultiplied target is (1, -1, -1) on the top half, 0 below; prediction 0
    assert terms["identity"].item() == pytest.approx(3 * 32 / (3 * 64))
    metrics = alpha_metrics(torch.tensor([[0.9, 0.9, 0.1, 0.6]]), torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert metrics["alpha_iou"].item() == pytest.approx(2 / 3)
    assert metrics["alpha_mae"].item() == pytest.approx((0.1 + 0.9 + 0.1 + 0.4) / 4)


def test_rgb_training_data_is_refused():
    from hfpapers.methods.layerdiffusion.recipe import LayerDiffusionRecipe

    rgb = data.load("shapes", resolution=16, num_train=4, num_test=2)["train"]
    with pytest.raises(ValueError, match="'RGB', not RGBA"):
        LayerDiffusionRecipe().prepare_dataset(rgb, None)


@pytest.mark.slow
def test_tiny_training_learns_alpha_and_keeps_the_latent_harmless(tmp_path):
    from hfpapers.engine import evaluate_folder, train
    from hfpapers.methods.layerdiffusion.recipe import LayerDiffusionRecipe

    layers = {"resolution": 32, "num_train": 512, "num_test": 64}
    result = train("layerdiffusion", str(tmp_path), dataset_kwargs=layers, progress_bar=False, num_epochs=8,
                   per_device_train_batch_size=16, learning_rate=2e-3, pretrain_vae_epochs=9,
                   finetune_unet=False)
    trained = result.eval_metrics
    # The same model before training: its pretrained VAE with a fresh (zero-offset) encoder and decoder.
    model = TransparentVAE.from_pretrained(tmp_path)
    fresh = TransparentVAE(model.vae, TransparentVAEDecoder.from_config(model.transparent_decoder.config),
                           LatentTransparencyEncoder.from_config(model.transparent_encoder.config)).eval()
    recipe = LayerDiffusionRecipe()
    test = recipe.prepare_dataset(data.load("rgba_layers", required=("image",), **layers)["test"], None)
    with torch.no_grad():
        untrained = recipe.compute_metrics(recipe.eval_outputs(fresh, {"rgba": test.tensors["rgba"]}))
    print({"trained": trained, "untrained": untrained})
    assert trained["alpha_iou"] > untrained["alpha_iou"] + 0.2
    assert trained["alpha_mae"] < 0.6 * untrained["alpha_mae"]
    # the offset stays nearly invisible to the frozen VAE: close to the VAE's own reconstruction error
    assert trained["identity_mse"] < 1.5 * trained["vae_mse"] + 0.01
    assert evaluate_folder(str(tmp_path))["alpha_iou"] == pytest.approx(trained["alpha_iou"], abs=1e-4)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: diffusers" in card and "TransparentVAE.from_pretrained" in card


def test_gan_term_trains_the_discriminator_only_on_its_own_loss():
    from hfpapers.methods.layerdiffusion.recipe import LayerDiffusionRecipe, PatchDiscriminator, \
        TransparentVAEWithDiscriminator

    torch.manual_seed(0)
    model = TransparentVAEWithDiscriminator(hfpapers.create_model("layerdiffusion", "tiny"),
                                            PatchDiscriminator(channels=8, num_layers=2))
    rgba = random_rgba(batch=2, height=32, width=32)
    recipe = LayerDiffusionRecipe(gan_weight=0.5, dihedral_augmentation=False)
    recipe.compute_loss(model, {"rgba": rgba}, None, TrainingState()).backward()
    disc_grads = [p.grad.clone() for p in model.discriminator.parameters()]
    decoder_grads = [p.grad.clone() for p in model.transparent_vae.transparent_decoder.parameters()]
    model.zero_grad()
    # by hand: the discriminator's hinge loss on detached fakes, the generator's terms through a fixed critic
    output = model(rgba)
    fake = output.rgba.clamp(0, 1)
    hinge = F.relu(1 - model.discriminator(rgba)).mean() + F.relu(1 + model.discriminator(fake.detach())).mean()
    hand_disc = torch.autograd.grad(hinge, list(model.discriminator.parameters()))
    terms = recipe.losses(output, rgba)
    generator = terms["reconstruction"] + terms["identity"] - 0.5 * model.discriminator(fake).mean()
    hand_decoder = torch.autograd.grad(generator, list(model.transparent_vae.transparent_decoder.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(disc_grads, hand_disc))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(decoder_grads, hand_decoder))


def test_push_and_load_by_repo_id(tiny_vae, tmp_path):
    from hfpapers.hub import push
    from hfpapers.testing import LocalHub

    tiny_vae.save_pretrained(tmp_path / "model")
    with LocalHub(data_dir=tmp_path / "hub") as hub:
        push(tmp_path / "model", "me/tiny-transparent-vae", endpoint=hub.url, token=hub.token)
        code = (
            "import torch\n"
            "from hfpapers.methods.layerdiffusion import TransparentVAE\n"
            "model = TransparentVAE.from_pretrained('me/tiny-transparent-vae')\n"
            "torch.manual_seed(0)\n"
            "print(model.decode(torch.randn(1, 4, 8, 8)).sum().item())\n"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"),
               "HF_TOKEN": hub.token, "HF_HUB_DISABLE_TELEMETRY": "1"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    with torch.no_grad():
        expected = tiny_vae.decode(torch.randn(1, 4, 8, 8)).sum().item()
    assert float(proc.stdout.split()[-1]) == pytest.approx(expected, rel=1e-6)


def test_sd15_pipeline_with_the_attention_sharing_patcher(tiny_vae):
    """The released SD 1.5 transparent model is an attention-sharing patcher (frames=1) on the UNet; the layer
    models (frames=3 / 2) need a batch that is a multiple of the frames."""
    from hfpapers.methods.layerdiffusion import AttentionSharingAdapter

    pipe = sd15_pipeline(tiny_vae)
    pipe.set_progress_bar_config(disable=True)
    adapter = AttentionSharingAdapter.from_unet(pipe.unet, frames=1, rank=4)
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    plain = pipe("a red cat", height=64, width=64, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    adapter.install(pipe.unet)
    patched = pipe("a red cat", height=64, width=64, num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert patched.shape == (1, 4, 64, 64) and not torch.equal(patched, plain)
    joint = sd15_pipeline(tiny_vae)
    AttentionSharingAdapter.from_unet(joint.unet, frames=3, rank=4).install(joint.unet)
    with pytest.raises(ValueError, match="multiple of"):
        joint("a red cat", height=64, width=64, num_inference_steps=2, num_images_per_prompt=2)


def test_a_decode_only_model_loads_and_a_broken_encoder_is_an_error(tiny_vae, tmp_path):
    TransparentVAE(tiny_vae.vae, tiny_vae.transparent_decoder).save_pretrained(tmp_path)
    loaded = TransparentVAE.from_pretrained(tmp_path)
    assert loaded.transparent_encoder is None
    with pytest.raises(ValueError, match="no transparent encoder"):
        loaded.encode(random_rgba())
    (tmp_path / "transparent_encoder").mkdir()
    with pytest.raises(OSError, match="transparent_encoder"):
        TransparentVAE.from_pretrained(tmp_path)


# --- diffusers model contract ------------------------------------------------------------------------------------

def test_encoder_and_decoder_return_outputs_or_tuples(tiny_vae):
    from diffusers.utils import BaseOutput

    rgba = random_rgba()
    encoder, decoder = tiny_vae.transparent_encoder, tiny_vae.transparent_decoder
    pixel, latent = torch.rand(2, 3, 64, 64), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        encoded, decoded = encoder(rgba), decoder(pixel, latent)
        assert isinstance(encoded, BaseOutput) and isinstance(decoded, BaseOutput)
        offset, = encoder(rgba, return_dict=False)
        sample, = decoder(pixel, latent, return_dict=False)
    assert torch.equal(encoded.offset, offset) and offset.shape == (2, 4, 8, 8)
    assert torch.equal(decoded.sample, sample) and sample.shape == (2, 4, 64, 64)


def test_decoder_gradient_checkpointing_gives_the_same_gradients(tiny_vae):
    torch.manual_seed(0)
    decoder = TransparentVAEDecoder.from_config(tiny_vae.transparent_decoder.config).train()
    for parameter in decoder.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    pixel, latent = torch.rand(2, 3, 64, 64), torch.randn(2, 4, 8, 8)

    def gradients():
        decoder.zero_grad()
        decoder(pixel, latent).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in decoder.named_parameters()}

    plain = gradients()
    decoder.enable_gradient_checkpointing()
    assert decoder.is_gradient_checkpointing
    recomputed = []
    decoder.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: recomputed.append(1))
    checkpointed = gradients()
    assert len(recomputed) == 2  # the block ran again in the backward pass: it was checkpointed
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_push_to_hub_and_from_pretrained_by_repo_id(tiny_vae, tmp_path):
    """`TransparentVAE.push_to_hub` (diffusers' mixin) and `from_pretrained(repo_id)`, a decode-only model too."""
    from hfpapers.testing import LocalHub

    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    torch.save(latents, tmp_path / "latents.pt")
    tiny_vae.save_pretrained(tmp_path / "model")
    code = (
        "import torch\n"
        "from hfpapers.methods.layerdiffusion import TransparentVAE\n"
        f"model = TransparentVAE.from_pretrained({str(tmp_path / 'model')!r})\n"
        "model.push_to_hub('me/transparent-vae')\n"
        "TransparentVAE(model.vae, model.transparent_decoder).push_to_hub('me/decode-only')\n"
        "loaded = TransparentVAE.from_pretrained('me/transparent-vae')\n"
        "assert TransparentVAE.from_pretrained('me/decode-only').transparent_encoder is None\n"
        f"latents = torch.load({str(tmp_path / 'latents.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    print(loaded.decode(latents).sum().item())\n"
    )
    with LocalHub(data_dir=tmp_path / "hub") as hub:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"),
               "HF_TOKEN": getattr(hub, "token", None) or "hf_fake", "HF_HUB_DISABLE_TELEMETRY": "1"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        expected = tiny_vae.decode(latents).sum().item()
    assert float(proc.stdout.split()[-1]) == pytest.approx(expected, rel=1e-6)


# (The bad RGBA every transparent VAE refuses is in tests/test_contract.py, from hfpapers.testing.tiny.)


def test_encode_accepts_pil_images_and_casts_float64_and_float16(tiny_vae):
    rgba = (random_rgba(batch=2) * 255).round() / 255  # exactly representable as 8-bit PIL images
    images = [PIL.Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "RGBA") for x in rgba]
    with torch.no_grad():
        expected = tiny_vae.encode(rgba)
        torch.testing.assert_close(tiny_vae.encode(images), expected)
        torch.testing.assert_close(tiny_vae.encode(images[0]), expected[:1])
        for dtype in (torch.float64, torch.float16):
            got = tiny_vae.encode(rgba.to(dtype))
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="not RGBA"):
        tiny_vae.encode(images[0].convert("RGB"))


def test_small_vae_scaling_factor_gives_sampled_latents_unit_std(tmp_path):
    """The diffusion model sees sampled latents (mean + std * offset): the factor must scale those, not the means,
    which are far narrower wherever the posterior noise dominates (the room the offset needs)."""
    from hfpapers.methods.layerdiffusion.modeling_layerdiffusion import rgba_to_tensor
    from hfpapers.methods.layerdiffusion.recipe import premultiplied, pretrain_vae
    from hfpapers.registry import get_method

    layers = data.load("rgba_layers", resolution=32, num_train=64, num_test=8)
    torch.manual_seed(0)
    vae = get_method("layerdiffusion").resolve("tiny").new_model().vae
    trained, _ = pretrain_vae(vae, layers, str(tmp_path / "vae"), seed=0, num_epochs=1, kl_weight=1e-4)
    images = premultiplied(rgba_to_tensor(list(layers["train"]["image"])))
    with torch.no_grad():
        posterior = trained.encode(images).latent_dist
    samples = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    assert (samples * trained.config.scaling_factor).std().item() == pytest.approx(1.0, rel=0.1)
