"""Transparent text-to-image and image-to-image pipelines for Stable Diffusion 1.5 and SDXL.

Each is the diffusers pipeline it subclasses plus two components, `transparent_decoder` and (optional)
`transparent_encoder`: sampling runs unchanged to latents, which the `TransparentVAE` decodes to RGBA; image-to-image
encodes an RGBA image to latents with transparency first. The UNet must be the transparent one (the released SDXL
LoRA / offsets merged, or the SD 1.5 attention-sharing patcher installed); the pipeline does not check that.

`TransparentVAEPipeline` is the transparent VAE alone (what `hfpapers train layerdiffusion` saves): RGBA in, RGBA out.

A folder saved with plain `save_pretrained()` loads with `DiffusionPipeline.from_pretrained(folder)` wherever
hfpapers is imported (it registers these classes with diffusers); `save_pretrained(..., remote_code=True)` writes a
Hub-with-code layout that `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` loads without
hfpapers installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import BaseOutput

from .modeling_layerdiffusion import TransparentVAE, checkerboard_preview, rgba_to_tensor, write_remote_code

__all__ = ["TransparentPipelineOutput", "TransparentStableDiffusionPipeline", "TransparentStableDiffusionImg2ImgPipeline",
           "TransparentStableDiffusionXLPipeline", "TransparentStableDiffusionXLImg2ImgPipeline", "TransparentVAEPipeline"]


@dataclass
class TransparentPipelineOutput(BaseOutput):
    """`images`: straight RGBA (PIL "RGBA" images, or (B, H, W, 4) numpy / (B, 4, H, W) torch in [0, 1]);
    `previews`: the same composited over the grey checkerboard, for looking at."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    previews: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class _Transparent:
    """What the four pipelines share: the transparent VAE, the size check and RGBA output."""

    def transparent_vae(self) -> TransparentVAE:
        return TransparentVAE(self.vae, self.transparent_decoder, self.transparent_encoder)

    def check_size(self, height: int, width: int) -> None:
        multiple = self.transparent_decoder.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for the transparent decoder, got "
                             f"{height}x{width}; the nearest valid size below is "
                             f"{height // multiple * multiple}x{width // multiple * multiple}")

    def encode_rgba(self, image) -> torch.Tensor:
        """RGBA image(s) -> scaled latents carrying transparency (what image-to-image starts from)."""
        if self.transparent_encoder is None:
            raise ValueError("this pipeline has no transparent_encoder; load one for image-to-image")
        rgba = rgba_to_tensor(image).to(self.vae.device)
        self.check_size(*rgba.shape[-2:])
        return self.transparent_vae().encode(rgba.to(self.vae.dtype))

    def rgba_output(self, latents, augment, passes_per_batch, output_type, return_dict):
        rgba = self.transparent_vae().decode(latents, augment=augment, passes_per_batch=passes_per_batch).float()
        preview = checkerboard_preview(rgba)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            images, previews = rgba.cpu(), preview.cpu()
        else:
            images, previews = (x.permute(0, 2, 3, 1).cpu().numpy() for x in (rgba, preview))
            if output_type == "pil":
                images, previews = ([PIL.Image.fromarray((x * 255).round().astype(np.uint8)) for x in batch]
                                    for batch in (images, previews))
            elif output_type != "np":
                raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not return_dict:
            return images, previews
        return TransparentPipelineOutput(images=images, previews=previews)

    def save_pretrained(self, save_directory, *args, remote_code: bool = False, **kwargs):
        """`remote_code=True` also writes this file and the modeling file, and points `model_index.json` at them,
        so that `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` needs no hfpapers."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if remote_code:
            write_remote_code(save_directory)


class _TextToImage(_Transparent):
    @torch.no_grad()
    def __call__(self, prompt=None, height: int | None = None, width: int | None = None, *, augment: bool = False,
                 passes_per_batch: int = 1, output_type: str = "pil", return_dict: bool = True, **kwargs):
        """The parent pipeline's arguments, plus `augment` (the decoder's 8-pass median) and `passes_per_batch`."""
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_size(height, width)
        latents = super().__call__(prompt, height=height, width=width, output_type="latent", **kwargs).images
        return self.rgba_output(latents, augment, passes_per_batch, output_type, return_dict)


class _ImageToImage(_Transparent):
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, *, augment: bool = False, passes_per_batch: int = 1,
                 output_type: str = "pil", return_dict: bool = True, **kwargs):
        """`image`: RGBA PIL image(s) or a (B, 4, H, W) tensor in [0, 1]; the rest as the parent pipeline's."""
        latents = super().__call__(prompt, image=self.encode_rgba(image), output_type="latent", **kwargs).images
        return self.rgba_output(latents, augment, passes_per_batch, output_type, return_dict)


class _SD15Components:
    """The Stable Diffusion 1.5 pipelines' components plus the transparent ones (diffusers reads this signature)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, transparent_decoder, safety_checker=None,
                 feature_extractor=None, image_encoder=None, transparent_encoder=None,
                 requires_safety_checker: bool = False):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        self.register_modules(transparent_decoder=transparent_decoder, transparent_encoder=transparent_encoder)


class TransparentStableDiffusionPipeline(_SD15Components, _TextToImage, StableDiffusionPipeline):
    """Stable Diffusion 1.5 text-to-image with RGBA output."""

    _optional_components = StableDiffusionPipeline._optional_components + ["transparent_encoder"]


class TransparentStableDiffusionImg2ImgPipeline(_SD15Components, _ImageToImage, StableDiffusionImg2ImgPipeline):
    """Stable Diffusion 1.5 image-to-image from an RGBA image (its transparency encoded) to RGBA."""

    _optional_components = StableDiffusionImg2ImgPipeline._optional_components + ["transparent_encoder"]


class TransparentStableDiffusionXLPipeline(_TextToImage, StableDiffusionXLPipeline):
    """SDXL text-to-image with RGBA output (use with the released transparent attention LoRA or offsets merged)."""

    _optional_components = StableDiffusionXLPipeline._optional_components + ["transparent_encoder"]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, transparent_decoder,
                 image_encoder=None, feature_extractor=None, transparent_encoder=None,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker)
        self.register_modules(transparent_decoder=transparent_decoder, transparent_encoder=transparent_encoder)


class TransparentStableDiffusionXLImg2ImgPipeline(_ImageToImage, StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image from an RGBA image (its transparency encoded) to RGBA."""

    _optional_components = StableDiffusionXLImg2ImgPipeline._optional_components + ["transparent_encoder"]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, transparent_decoder,
                 image_encoder=None, feature_extractor=None, transparent_encoder=None,
                 requires_aesthetics_score: bool = False, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, requires_aesthetics_score, force_zeros_for_empty_prompt, add_watermarker)
        self.register_modules(transparent_decoder=transparent_decoder, transparent_encoder=transparent_encoder)


class TransparentVAEPipeline(_Transparent, DiffusionPipeline):
    """The transparent VAE on its own, as a diffusers pipeline (what a saved `TransparentVAE` folder loads as):
    RGBA image(s) -> latents carrying transparency -> RGBA, or scaled latents -> RGBA."""

    _optional_components = ["transparent_encoder"]
    model_cpu_offload_seq = "transparent_encoder->vae->transparent_decoder"

    def __init__(self, vae, transparent_decoder, transparent_encoder=None):
        super().__init__()
        self.register_modules(vae=vae, transparent_decoder=transparent_decoder, transparent_encoder=transparent_encoder)

    @torch.no_grad()
    def __call__(self, image=None, latents: torch.Tensor | None = None, *, augment: bool = False,
                 passes_per_batch: int = 1, output_type: str = "pil", return_dict: bool = True):
        """`image`: RGBA PIL image(s) or a (B, 4, H, W) tensor in [0, 1], encoded and decoded again; or `latents`:
        scaled (B, 4, H / 8, W / 8) latents (what `encode_rgba` and the text-to-image pipelines make), decoded."""
        if (image is None) == (latents is None):
            raise ValueError("pass either an RGBA `image` to encode and decode, or `latents` to decode, not "
                             f"{'both' if image is not None else 'neither'}")
        if latents is None:
            latents = self.encode_rgba(image)
        return self.rgba_output(latents, augment, passes_per_batch, output_type, return_dict)
