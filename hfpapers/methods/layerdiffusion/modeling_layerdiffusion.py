"""LayerDiffuse latent transparency (Zhang & Agrawala, arXiv 2402.17113) as diffusers models.

A frozen Stable Diffusion VAE learns nothing new. Transparency rides on its latent as an offset:
`LatentTransparencyEncoder` turns (alpha, padded RGB) into an offset that replaces the Gaussian noise of the
VAE posterior (`z = mean + std * offset`), and `TransparentVAEDecoder` (the official "UNet1024") reads the
VAE-decoded RGB plus the latent and returns alpha and the straight (not premultiplied) foreground colour.
`TransparentVAE` joins the three so that RGBA goes in and comes out. Architectures and key names follow the
released weights, so the official safetensors load with `strict=True`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, PushToHubMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from huggingface_hub import HfApi
from torch import nn
from torch.nn import functional as F

__all__ = ["LatentTransparencyEncoder", "LatentTransparencyEncoderOutput", "TransparentVAEDecoder",
           "TransparentVAEDecoderOutput", "TransparentVAE", "TransparentVAEOutput", "pad_rgb", "checkerboard_preview",
           "rgba_to_tensor", "dihedral", "AUGMENTATIONS"]

# The decoder adds the latent to its features just before this down block: after three halvings, at the
# VAE's 1/8 latent resolution.
LATENT_BLOCK = 3
# Test-time augmentation of the official decoder: (horizontal flip, quarter turns). Ordered so that the passes
# that keep the image's shape come first and the transposing ones after, which lets each group run as one batch.
AUGMENTATIONS = ((False, 0), (True, 0), (False, 2), (True, 2), (False, 1), (True, 1), (False, 3), (True, 3))
# The decoder's bf16 path (under `torch.autocast`) keeps this many of its highest-resolution levels, and its input and
# output convolutions, in float32. Measured on random weights at 512 px, bf16 in one block alone moves the output by
# 5-13e-3 (relative L2) at full and half resolution, 3-4e-3 at 1/4, about 1e-3 or less below: all in bf16 it is
# 2.3e-2 off, with the full-resolution level in float32 1.0e-2, with two levels 6e-3 (evaluation/benchmarks/README.md).
FULL_PRECISION_LEVELS = 2
# The sibling file of the diffusers pipelines, shipped with every saved folder as remote code (`write_remote_code`).
PIPELINE_MODULE = "pipeline_layerdiffusion"


def _area_resize_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) weights of exact area resampling: output pixel i averages the input span
    [i*s, (i+1)*s) with s = size_in / size_out, weighting each input pixel by its overlap (cv2's INTER_AREA)."""
    scale = size_in / size_out
    starts = torch.arange(size_out, dtype=like.dtype, device=like.device)[:, None] * scale
    pixels = torch.arange(size_in, dtype=like.dtype, device=like.device)[None, :]
    overlap = (torch.minimum(starts + scale, pixels + 1) - torch.maximum(starts, pixels)).clamp(min=0)
    return overlap / scale


def _area_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    rows = _area_resize_matrix(image.shape[-2], height, image)
    cols = _area_resize_matrix(image.shape[-1], width, image)
    return rows @ image @ cols.T


@torch.no_grad()
def pad_rgb(rgba: torch.Tensor, dk: float = 1.2) -> torch.Tensor:
    """The "padded RGB" every LayerDiffuse model is trained on: (B, 4, H, W) straight RGBA in [0, 1] ->
    (B, 3, H, W) where visible colours are kept and invisible ones are filled from their surroundings.

    An alpha-weighted pyramid (each level 1/dk the size of the previous, down to one pixel) is built from the
    premultiplied colour; going back up, each level's colour is its premultiplied colour plus the coarser
    estimate times (1 - alpha).
    """
    _check_rgba(rgba)
    colour, alpha = rgba[:, :3].double(), rgba[:, 3:].double()
    pyramid = [(colour * alpha, alpha)]
    while min(pyramid[-1][1].shape[-2:]) > 1:
        height, width = pyramid[-1][1].shape[-2:]
        size = (int(height / dk), int(width / dk))
        pyramid.append(tuple(_area_resize(level, *size) for level in pyramid[-1]))
    top_colour, top_alpha = pyramid[-1]
    filled = top_colour.sum((-2, -1), keepdim=True) / top_alpha.sum((-2, -1), keepdim=True).clamp(1e-8, 1e32)
    for level_colour, level_alpha in reversed(pyramid):
        filled = F.interpolate(filled, size=level_colour.shape[-2:], mode="bilinear", align_corners=False)
        filled = level_colour + filled * (1.0 - level_alpha)
    return filled.to(rgba.dtype)


def _check_rgba(rgba: torch.Tensor, multiple: int = 1) -> None:
    """Straight RGBA as every LayerDiffuse part expects it: a finite float (B >= 1, 4, H, W) batch in [0, 1], with
    H and W multiples of `multiple` (the VAE's downsampling, where a latent is made)."""
    if not torch.is_tensor(rgba) or rgba.ndim != 4 or rgba.shape[1] != 4:
        got = f"shape {tuple(rgba.shape)}" if torch.is_tensor(rgba) else type(rgba).__name__
        raise ValueError(f"expected straight RGBA of shape (batch, 4, height, width) in [0, 1], got {got}; "
                         "RGB without alpha has no transparency to encode")
    if rgba.shape[0] == 0 or min(rgba.shape[2:]) == 0:
        raise ValueError(f"expected at least one RGBA image of at least 1x1 pixels, got shape {tuple(rgba.shape)}")
    height, width = rgba.shape[-2:]
    if height % multiple or width % multiple:
        fit = [max(multiple, side // multiple * multiple) for side in (height, width)]
        raise ValueError(f"height and width must be multiples of {multiple} (the VAE's downsampling), got "
                         f"{height}x{width}; resize or crop the image, e.g. to {fit[0]}x{fit[1]}")
    if not rgba.is_floating_point():
        raise ValueError(f"expected float RGBA in [0, 1], got {rgba.dtype} values (divide 0-255 pixels by 255, or "
                         "pass PIL images)")
    if torch.compiler.is_compiling():  # the value checks are data-dependent: a torch.compile trace skips them
        return
    low, high = rgba.aminmax()  # NaN makes both NaN, an inf is one of them
    if not torch.isfinite(low) or not torch.isfinite(high):
        raise ValueError("the RGBA image contains NaN or infinite values; expected finite values in [0, 1]")
    if low < 0 or high > 1:
        raise ValueError(f"expected RGBA values in [0, 1], got values from {low.item():g} to {high.item():g} "
                         "(0-255 pixels must be divided by 255)")


def rgba_to_tensor(image) -> torch.Tensor:
    """RGBA PIL image(s) of one size, or a (B, 4, H, W) tensor in [0, 1] -> (B, 4, H, W) float tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 4 else image[None]
        _check_rgba(tensor)
        return tensor.float()
    images = image if isinstance(image, (list, tuple)) else [image]
    for i, item in enumerate(images):
        if not isinstance(item, PIL.Image.Image):
            raise ValueError(f"expected RGBA PIL image(s) or a (batch, 4, height, width) tensor in [0, 1], got "
                             f"{type(item).__name__} (image {i})")
        if "A" not in item.getbands():
            raise ValueError(f"image {i} is {item.mode!r}, not RGBA: latent transparency needs an alpha channel "
                             "(for a fully opaque image, add one with image.putalpha(255))")
    sizes = sorted({item.size for item in images})
    if len(sizes) != 1:
        raise ValueError(f"images must share one size to be batched, found sizes {sizes}")
    arrays = np.stack([np.asarray(item.convert("RGBA"), dtype=np.float32) / 255 for item in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def checkerboard_preview(rgba: torch.Tensor, cell: int = 64) -> torch.Tensor:
    """(B, 4, H, W) RGBA in [0, 1] composited over the official grey checkerboard (0.45 / 0.55, `cell` px)."""
    height, width = rgba.shape[-2:]
    ys = torch.arange(height, device=rgba.device)[:, None] // cell
    xs = torch.arange(width, device=rgba.device)[None, :] // cell
    board = 0.45 + 0.1 * ((ys + xs) % 2).to(rgba.dtype)
    alpha = rgba[:, 3:]
    return rgba[:, :3] * alpha + board * (1 - alpha)


@dataclass
class LatentTransparencyEncoderOutput(BaseOutput):
    """`offset`: (B, latent_channels, H / 8, W / 8), what replaces the Gaussian noise of the VAE posterior."""

    offset: torch.Tensor


@dataclass
class TransparentVAEDecoderOutput(BaseOutput):
    """`sample`: the raw (B, 4, H, W) estimate, alpha first, then R, G, B (not clipped)."""

    sample: torch.Tensor


class LatentTransparencyEncoder(ModelMixin, ConfigMixin):
    """(alpha, padded RGB) -> a latent offset at the VAE's resolution (the released encoder: 1,181,764 parameters).

    Each level is a stride-2 convolution (stride 1 for the first) and a second convolution, with SiLU between
    all of them; the last convolution starts at zero so an untrained encoder leaves the latent unchanged.
    `offset_scale` multiplies the output: 300 for the official diffusers-CLI weights, 1 for the Forge ones.
    """

    @register_to_config
    def __init__(self, in_channels: int = 4, block_out_channels: tuple[int, ...] = (32, 64, 128, 256),
                 latent_channels: int = 4, offset_scale: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for level, channels in enumerate(block_out_channels):
            layers += [nn.Conv2d(previous, channels, 3, stride=1 if level == 0 else 2, padding=1), nn.SiLU(),
                       nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU()]
            previous = channels
        out = nn.Conv2d(previous, latent_channels, 3, padding=1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.blocks = nn.Sequential(*layers, out)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, rgba: torch.Tensor, return_dict: bool = True) -> LatentTransparencyEncoderOutput | tuple:
        """Straight RGBA (B, 4, H, W) in [0, 1], H and W multiples of 8 -> offset (B, latent_channels, H / 8, W / 8)."""
        _check_rgba(rgba, self.downsample_factor)
        alpha = rgba[:, 3:]
        features = torch.cat([alpha, pad_rgb(rgba)], dim=1).to(self.dtype)
        offset = self.blocks(features) * self.config.offset_scale
        return LatentTransparencyEncoderOutput(offset=offset) if return_dict else (offset,)


class TransparentVAEDecoder(ModelMixin, ConfigMixin):
    """The official transparent decoder ("UNet1024"): VAE-decoded RGB + unscaled latent -> (alpha, RGB).

    A diffusers UNet without time embedding; the latent enters through a zero-initialised 1x1 convolution
    added before down block 3. The output's channel 0 is alpha, channels 1-3 the straight foreground colour.
    Height and width must be multiples of 2^(number of blocks - 1): 64 for the released architecture.
    """

    _supports_gradient_checkpointing = True  # the diffusers down / mid / up blocks checkpoint themselves

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3,
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (32, 32, 64, 128, 256, 512, 512),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 4,
        norm_eps: float = 1e-5,
        latent_channels: int = 4,
    ):
        super().__init__()
        levels = len(block_out_channels)
        if not (len(down_block_types) == len(up_block_types) == levels) or levels <= LATENT_BLOCK:
            raise ValueError(f"need as many down and up block types as block_out_channels, and more than "
                             f"{LATENT_BLOCK} levels; got {len(down_block_types)}, {len(up_block_types)}, {levels}")
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.latent_conv_in = nn.Conv2d(latent_channels, block_out_channels[LATENT_BLOCK - 1], 1)
        nn.init.zeros_(self.latent_conv_in.weight)
        nn.init.zeros_(self.latent_conv_in.bias)
        shared = dict(temb_channels=None, resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                      resnet_time_scale_shift="default", dropout=dropout)
        self.down_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=input_channel, out_channels=output_channel,
                add_downsample=i < levels - 1, downsample_padding=downsample_padding, downsample_type=downsample_type,
                attention_head_dim=attention_head_dim or output_channel, **shared))
        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1], temb_channels=None, dropout=dropout, resnet_eps=norm_eps,
            resnet_act_fn=act_fn, output_scale_factor=mid_block_scale_factor, resnet_time_scale_shift="default",
            attention_head_dim=attention_head_dim or block_out_channels[-1], resnet_groups=norm_num_groups,
            attn_groups=None, add_attention=True)
        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList()
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, levels - 1)]
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block + 1, in_channels=input_channel, out_channels=output_channel,
                prev_output_channel=prev_output_channel, add_upsample=i < levels - 1, upsample_type=upsample_type,
                attention_head_dim=attention_head_dim or output_channel, **shared))
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def check_inputs(self, pixel: torch.Tensor, latent: torch.Tensor) -> None:
        height, width = pixel.shape[-2:]
        if pixel.ndim != 4 or pixel.shape[1] != self.config.in_channels:
            raise ValueError(f"pixel must be (batch, {self.config.in_channels}, height, width), got {tuple(pixel.shape)}")
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"height and width must be multiples of {self.size_multiple} for this decoder "
                             f"({len(self.config.block_out_channels) - 1} downsamplings), got {height}x{width}; "
                             f"resize or crop the image, e.g. to {height // self.size_multiple * self.size_multiple}x"
                             f"{width // self.size_multiple * self.size_multiple}")
        latent_size = (height // 2 ** LATENT_BLOCK, width // 2 ** LATENT_BLOCK)
        if latent.ndim != 4 or latent.shape[1] != self.config.latent_channels or tuple(latent.shape[-2:]) != latent_size:
            raise ValueError(f"latent must be (batch, {self.config.latent_channels}, {latent_size[0]}, {latent_size[1]}) "
                             f"for {height}x{width} pixels, got {tuple(latent.shape)}")
        if latent.shape[0] != pixel.shape[0]:
            raise ValueError(f"pixel and latent batch sizes differ: {pixel.shape[0]} vs {latent.shape[0]}")

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor,
                return_dict: bool = True) -> TransparentVAEDecoderOutput | tuple:
        """pixel: VAE-decoded RGB (B, 3, H, W) in [0, 1]; latent: the unscaled VAE latent (B, 4, H/8, W/8).
        Returns the raw (B, 4, H, W) output as `sample`: alpha, then R, G, B.

        Under `torch.autocast(device, dtype=torch.bfloat16)` (the opt-in bf16 path) the FULL_PRECISION_LEVELS
        highest-resolution levels (down and up blocks) and the input and output convolutions run in float32
        (autocast off), the lower levels in bf16, all channels-last: 6e-3 from float32 instead of 2.3e-2 (relative
        L2, 512 px), at 1.4x its speed on a 2-core CPU. Without autocast none of this applies: the float32 path is
        the official computation."""
        self.check_inputs(pixel, latent)
        mixed = torch.is_autocast_enabled(pixel.device.type)
        if mixed:  # bf16 convolutions on CPU run 1.5-2.6x faster channels-last
            pixel, latent = (x.contiguous(memory_format=torch.channels_last) for x in (pixel, latent))
        exact_levels = FULL_PRECISION_LEVELS if mixed else 0
        levels = len(self.down_blocks)
        with self._float32(mixed, pixel.device.type):
            latent_features = self.latent_conv_in(latent.to(self.dtype))
            sample = self.conv_in(pixel.to(self.dtype))
        skips = (sample,)
        for i, block in enumerate(self.down_blocks):
            if i == LATENT_BLOCK:
                sample = sample + latent_features
            with self._float32(i < exact_levels, pixel.device.type):
                sample, res_samples = block(hidden_states=sample, temb=None)
            skips += res_samples
        sample = self.mid_block(sample, None)
        for i, block in enumerate(self.up_blocks):
            res_samples, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            exact = i >= levels - exact_levels
            if exact:  # back from the bf16 levels
                sample, res_samples = sample.to(self.dtype), tuple(r.to(self.dtype) for r in res_samples)
            with self._float32(exact, pixel.device.type):
                sample = block(sample, res_samples, None)
        with self._float32(mixed, pixel.device.type):
            sample = self.conv_out(self.conv_act(self.conv_norm_out(sample.to(self.dtype))))
        if mixed:
            sample = sample.contiguous()
        return TransparentVAEDecoderOutput(sample=sample) if return_dict else (sample,)

    @staticmethod
    def _float32(enabled: bool, device_type: str):
        """autocast switched off: where `enabled`, the bf16 path computes in the model's own dtype."""
        return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()

    def estimate(self, pixel: torch.Tensor, latent: torch.Tensor, augment: bool = False,
                 passes_per_batch: int = 1) -> torch.Tensor:
        """(alpha, R, G, B) in [0, 1]. `augment` runs the official 8 passes (4 quarter turns, each with and
        without a horizontal flip) and takes the per-pixel median (the lower middle value, as `torch.median`).
        `passes_per_batch` (1-8) trades memory for speed: passes that share a shape run together in batches
        of at most that many. The default, one at a time, is the official loop's memory (on a 2-core CPU batching
        buys no speed; see evaluation/benchmarks/layerdiffusion_decoder.py)."""
        if not augment:
            return self(pixel, latent, return_dict=False)[0].clamp(0, 1)
        if not 1 <= passes_per_batch <= len(AUGMENTATIONS):
            raise ValueError(f"passes_per_batch must be between 1 and {len(AUGMENTATIONS)}, got {passes_per_batch}")
        batch = pixel.shape[0]
        outputs = []
        for start in range(0, len(AUGMENTATIONS), passes_per_batch):
            chunk = AUGMENTATIONS[start:start + passes_per_batch]
            # quarter turns by an odd number transpose a non-square image: run the two shapes apart
            for group in (tuple(a for a in chunk if a[1] % 2 == 0), tuple(a for a in chunk if a[1] % 2 == 1)):
                if not group:
                    continue
                feed_pixel = torch.cat([dihedral(pixel, *a) for a in group])
                feed_latent = torch.cat([dihedral(latent, *a) for a in group])
                estimates = self(feed_pixel, feed_latent, return_dict=False)[0].clamp(0, 1).split(batch)
                outputs += [_unaugment(e, *a) for e, a in zip(estimates, group)]
        return torch.stack(outputs).median(dim=0).values


def dihedral(x: torch.Tensor, flip: bool, quarter_turns: int) -> torch.Tensor:
    """One of the 8 test-time transforms of (B, C, H, W): an optional horizontal flip, then quarter turns."""
    x = torch.flip(x, dims=(3,)) if flip else x
    return torch.rot90(x, k=quarter_turns, dims=(2, 3))


def _unaugment(x: torch.Tensor, flip: bool, quarter_turns: int) -> torch.Tensor:
    x = torch.rot90(x, k=-quarter_turns, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip else x


@dataclass
class TransparentVAEOutput(BaseOutput):
    """What training needs from one RGBA -> latent -> RGBA round trip."""

    rgba: torch.Tensor  # the transparent decoder's raw estimate as (R, G, B, A), not clipped
    pixel: torch.Tensor  # the frozen VAE's decoding of the transparent latent, in [-1, 1]
    latent: torch.Tensor  # the unscaled latent with the offset


class TransparentVAE(nn.Module, PushToHubMixin):
    """A Stable Diffusion `AutoencoderKL` with latent transparency: `encode(rgba)` -> latents that carry the
    alpha channel yet decode to the premultiplied image with the plain VAE; `decode(latents)` -> RGBA.

    Latents are scaled like the pipelines' (`vae.config.scaling_factor`), so `encode`/`decode` stand in for the
    usual `vae.encode(...).latent_dist.sample() * scaling_factor` and `vae.decode(latents / scaling_factor)`.
    The folder layout of `save_pretrained` (`vae/`, `transparent_encoder/`, `transparent_decoder/`) is the one a
    transparent pipeline uses, so `from_pretrained` also reads those parts out of a saved pipeline, from a folder
    or a Hub repo id, and `push_to_hub(repo_id)` uploads that layout (diffusers' `PushToHubMixin`). The saved
    folder is also a diffusers `TransparentVAEPipeline` with its code, for users without hfpapers.
    `encode` takes RGBA tensors or RGBA PIL images, as the image-to-image pipelines do.
    """

    SUBFOLDERS = {"vae": AutoencoderKL, "transparent_encoder": LatentTransparencyEncoder,
                  "transparent_decoder": TransparentVAEDecoder}

    def __init__(self, vae: AutoencoderKL, transparent_decoder: TransparentVAEDecoder,
                 transparent_encoder: LatentTransparencyEncoder | None = None):
        super().__init__()
        self.vae, self.transparent_decoder, self.transparent_encoder = vae, transparent_decoder, transparent_encoder
        if transparent_decoder.config.latent_channels != vae.config.latent_channels:
            raise ValueError(f"the transparent decoder reads {transparent_decoder.config.latent_channels}-channel latents "
                             f"but the VAE makes {vae.config.latent_channels}")
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if vae_factor != 2 ** LATENT_BLOCK:
            raise ValueError(f"the transparent decoder expects latents at 1/{2 ** LATENT_BLOCK} of the image size; "
                             f"this VAE downsamples by {vae_factor}")
        if transparent_encoder is not None and transparent_encoder.downsample_factor != vae_factor:
            raise ValueError(f"the transparent encoder downsamples by {transparent_encoder.downsample_factor}, "
                             f"the VAE by {vae_factor}")
        vae.requires_grad_(False)  # the pretrained latent space stays exactly as it was

    @classmethod
    def from_configs(cls, vae: dict, transparent_decoder: dict, transparent_encoder: dict | None = None,
                     base_vae: str | None = None) -> "TransparentVAE":
        """Randomly initialised encoder and decoder from config dicts; the VAE from `base_vae` (a path or Hub
        id of an `AutoencoderKL`, e.g. "stabilityai/sdxl-vae") when given, else random from `vae`."""
        sd_vae = AutoencoderKL.from_pretrained(base_vae) if base_vae else AutoencoderKL.from_config(vae)
        encoder = LatentTransparencyEncoder.from_config(transparent_encoder) if transparent_encoder is not None else None
        return cls(sd_vae, TransparentVAEDecoder.from_config(transparent_decoder), encoder)

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    def _check_latents(self, latents: torch.Tensor) -> None:
        channels = self.vae.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise ValueError(f"expected latents of shape (batch, {channels}, height / 8, width / 8) from this VAE, "
                             f"got {tuple(latents.shape)}; latents of another VAE cannot be decoded with it")

    def posterior(self, rgba: torch.Tensor):
        """The frozen VAE's posterior for RGBA: it sees the colour premultiplied by alpha in [-1, 1] (the image
        over mid-grey), exactly what the official encoder feeds it."""
        _check_rgba(rgba, 2 ** LATENT_BLOCK)
        premultiplied = (rgba[:, :3] * 2 - 1) * rgba[:, 3:]
        return self.vae.encode(premultiplied.to(self.vae.dtype)).latent_dist

    def encode_unscaled(self, rgba) -> torch.Tensor:
        """The latent with transparency, `mean + std * offset`, before the pipeline's scaling. `rgba`: a
        (B, 4, H, W) tensor in [0, 1] or RGBA PIL image(s), H and W multiples of 8."""
        if self.transparent_encoder is None:
            raise ValueError("this TransparentVAE has no transparent encoder; load one to encode RGBA images")
        if not torch.is_tensor(rgba):
            rgba = rgba_to_tensor(rgba).to(self.vae.device)
        posterior = self.posterior(rgba)
        offset = self.transparent_encoder(rgba.to(self.transparent_encoder.dtype), return_dict=False)[0]
        return posterior.mean + posterior.std * offset.to(posterior.mean.dtype)

    def encode(self, rgba) -> torch.Tensor:
        """Straight RGBA (B, 4, H, W) in [0, 1], or RGBA PIL image(s) -> scaled latents carrying transparency."""
        return self.encode_unscaled(rgba) * self.scaling_factor

    def decode(self, latents: torch.Tensor, augment: bool = False, passes_per_batch: int = 1) -> torch.Tensor:
        """Scaled latents (B, 4, H/8, W/8) -> straight RGBA (B, 4, H, W) in [0, 1]; `augment` = the 8-pass median."""
        self._check_latents(latents)
        latent = latents / self.scaling_factor
        pixel = (self.vae.decode(latent.to(self.vae.dtype)).sample * 0.5 + 0.5).clamp(0, 1)
        estimate = self.transparent_decoder.estimate(pixel, latent, augment=augment, passes_per_batch=passes_per_batch)
        return _alpha_last(estimate)

    def forward(self, rgba: torch.Tensor) -> TransparentVAEOutput:
        """Encode and decode straight RGBA in [0, 1] (one pass, unclipped): the training round trip."""
        latent = self.encode_unscaled(rgba)
        decoded = self.vae.decode(latent).sample
        estimate = self.transparent_decoder((decoded * 0.5 + 0.5).clamp(0, 1), latent, return_dict=False)[0]
        return TransparentVAEOutput(rgba=_alpha_last(estimate), pixel=decoded, latent=latent)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The parts in their subfolders, plus a `model_index.json` and this code: the folder is then also a
        `TransparentVAEPipeline` that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads
        where hfpapers is not installed (`kwargs` go to each part's `save_pretrained`)."""
        root = Path(save_directory)
        index = {"_class_name": "TransparentVAEPipeline", "_diffusers_version": diffusers.__version__}
        for name in self.SUBFOLDERS:
            part = getattr(self, name)
            index[name] = [None, None]  # how diffusers records an absent optional component
            if part is not None:
                part.save_pretrained(root / name, **kwargs)
                module = type(part).__module__
                index[name] = ["diffusers" if module.startswith("diffusers.") else module, type(part).__name__]
        (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_remote_code(root)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "TransparentVAE":
        """From a folder or Hub repo id with `vae/`, `transparent_decoder/` and optionally `transparent_encoder/`
        (a saved transparent pipeline has them all); `kwargs` (revision, token, torch_dtype, ...) go to each part."""
        parts = {}
        for name, part_class in cls.SUBFOLDERS.items():
            try:
                parts[name] = part_class.from_pretrained(path, subfolder=name, **kwargs)
            except OSError as error:
                # the encoder is optional (a decode-only model), but one that is there and broken is an error
                if name == "transparent_encoder" and not _has_subfolder(path, name, kwargs):
                    parts[name] = None
                    continue
                raise OSError(f"{path} has no loadable {name}/ folder: {error}") from error
        return cls(**parts)


def write_remote_code(save_directory: str | Path) -> None:
    """Make a saved diffusers folder of ours load with `trust_remote_code=True` where hfpapers is not installed.

    diffusers imports a pipeline's module from the folder's root (`_class_name` = [module, class] in
    `model_index.json`) and a custom component's module from the component's own folder ([module, class] with
    `<component>/<module>.py` present), so the pipelines' file goes to the root, this file next to it (the pipelines
    import it) and into each folder of a component defined here, and `model_index.json` names them."""
    root, here = Path(save_directory), Path(__file__).resolve()
    pipelines = here.with_name(f"{PIPELINE_MODULE}.py")
    shutil.copy(pipelines, root / pipelines.name)
    shutil.copy(here, root / here.name)
    index = json.loads((root / "model_index.json").read_text())
    class_name = index["_class_name"]
    index["_class_name"] = [PIPELINE_MODULE, class_name[1] if isinstance(class_name, list) else class_name]
    for name, value in index.items():
        # saved from hfpapers: "hfpapers.methods.layerdiffusion.modeling_layerdiffusion"; from remote code: the
        # module's name in diffusers' cache of dynamic modules
        if isinstance(value, list) and value[0] is not None and value[0].rpartition(".")[2] == here.stem:
            shutil.copy(here, root / name / here.name)
            index[name] = [here.stem, value[1]]
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _has_subfolder(path: str | Path, name: str, kwargs: dict) -> bool:
    """Whether a local folder, or else a Hub repo, has `name/` (then a failure to load it is a real error)."""
    if Path(path).is_dir():
        return (Path(path) / name).is_dir()
    try:
        files = HfApi().list_repo_files(str(path), revision=kwargs.get("revision"), token=kwargs.get("token"))
    except Exception:  # offline or unreachable: only the part's own error can tell, so report it
        return True
    return any(f.startswith(f"{name}/") for f in files)


def _alpha_last(estimate: torch.Tensor) -> torch.Tensor:
    """The decoder's (A, R, G, B) as RGBA."""
    return torch.cat([estimate[:, 1:], estimate[:, :1]], dim=1)
