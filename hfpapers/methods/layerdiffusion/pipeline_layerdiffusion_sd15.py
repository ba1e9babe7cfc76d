"""LayerDiffuse's Stable Diffusion 1.5 layer pipeline: foreground, background and blended image in one call, or
the missing layers given one, on a UNet patched with the attention-sharing adapter (`attention_sharing.py`).

The adapter decides the mode, as the released files do:

- `layer_sd15_joint` (3 frames): foreground (RGBA), background and blended image together;
- `layer_sd15_fg2bg` (2 frames, control): background and blended image for a given RGBA `foreground`;
- `layer_sd15_bg2fg` (2 frames, control): foreground (RGBA) and blended image for a given `background`.

Each picture is a group of frames in the UNet batch (layout `(b f)`), and each frame reads its own prompt: as in
Forge, frame prompt p becomes "p, <prompt>" and a missing one is the shared prompt. Every cross-attention of an SD
1.5 UNet is patched, so giving the rows their frame's prompt embedding equals Forge's `cond_overwrite`. The
condition layer is composited over mid-grey (`0.5 + (rgb - 0.5) * alpha`, Forge's `rgba2rgbfp32`) and must already
have the output's size. Only the foreground frame is decoded with the transparent decoder (Forge's `mod_number`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import BaseOutput

from .attention_sharing import AttentionSharingAdapter, attention_sharing_module_names
from .modeling_layerdiffusion import checkerboard_preview, rgba_to_tensor, write_remote_code
from .pipeline_layerdiffusion import _Transparent

__all__ = ["LayerPipelineOutput", "StableDiffusionLayersPipeline", "MODES"]

# The frames of each mode, in the order of the released files' LoRAs.
MODES = {"joint": ("foreground", "background", "blended"), "fg2bg": ("background", "blended"),
         "bg2fg": ("foreground", "blended")}


@dataclass
class LayerPipelineOutput(BaseOutput):
    """The layers of each picture, None where the mode does not make them: `foreground` straight RGBA, `background`
    and `blended` RGB, `previews` the foreground over the grey checkerboard (PIL images, or numpy / torch in [0, 1]
    as `output_type` says)."""

    foreground: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    background: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    blended: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    previews: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None


class StableDiffusionLayersPipeline(_Transparent, StableDiffusionPipeline):
    """SD 1.5 + a LayerDiffuse attention-sharing adapter (3 frames: joint; 2 frames with control: fg2bg / bg2fg)."""

    _optional_components = StableDiffusionPipeline._optional_components + ["transparent_encoder"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, transparent_decoder,
                 attention_sharing: AttentionSharingAdapter, safety_checker=None, feature_extractor=None,
                 image_encoder=None, transparent_encoder=None, requires_safety_checker: bool = False):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        frames, control = attention_sharing.config.frames, attention_sharing.config.use_control
        if (frames, control) not in ((3, False), (2, True)):
            raise ValueError(f"a {frames}-frame adapter{' with' if control else ' without'} control is not a layer "
                             "model: joint needs 3 frames, fg2bg / bg2fg 2 frames with the control path")
        self.register_modules(transparent_decoder=transparent_decoder, transparent_encoder=transparent_encoder,
                              attention_sharing=attention_sharing)
        attention_sharing.install(unet)

    def mode(self, foreground=None, background=None) -> str:
        """"joint", "fg2bg" or "bg2fg": what the adapter makes from the condition layer given (if any)."""
        if self.attention_sharing.config.frames == 3:
            if foreground is not None or background is not None:
                raise ValueError("the joint model makes all three layers; it takes no foreground or background")
            return "joint"
        if (foreground is None) == (background is None):
            raise ValueError("this fg2bg / bg2fg model needs one condition layer: a `foreground` (RGBA) to make the "
                             f"background for, or a `background` to make the foreground for, not "
                             f"{'both' if foreground is not None else 'neither'}")
        return "fg2bg" if foreground is not None else "bg2fg"

    def condition_image(self, image, height: int, width: int, needs_alpha: bool) -> torch.Tensor:
        """A condition layer as the control encoder reads it: (1, 3, height, width) in [0, 1], over mid-grey."""
        name = "foreground" if needs_alpha else "background"
        if isinstance(image, PIL.Image.Image) and "A" not in image.getbands():
            if needs_alpha:
                raise ValueError(f"the foreground must have an alpha channel (RGBA), got a {image.mode!r} image")
            image = image.convert("RGBA")  # an opaque background
        if torch.is_tensor(image) and image.ndim == 4 and image.shape[1] == 3 and not needs_alpha:
            image = torch.cat([image, torch.ones_like(image[:, :1])], dim=1)
        if torch.is_tensor(image) and (image.ndim != 4 or image.shape[:2] != (1, 4)):
            raise ValueError(f"the {name} must be one (1, 4, height, width) RGBA tensor in [0, 1]"
                             f"{'' if needs_alpha else ' (or (1, 3, ...) RGB)'}, got shape {tuple(image.shape)}")
        rgba = rgba_to_tensor(image)
        if len(rgba) != 1:
            raise ValueError(f"give one {name} image, got {len(rgba)}")
        if tuple(rgba.shape[-2:]) != (height, width):
            raise ValueError(f"the {name} is {rgba.shape[-1]}x{rgba.shape[-2]} pixels but the layers are {width}x"
                             f"{height}: resize or crop it to the output size first")
        return 0.5 + (rgba[:, :3] - 0.5) * rgba[:, 3:]

    def frame_prompts(self, prompt: str, frame_prompts, frames: tuple[str, ...]) -> list[str]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be one string (the picture's), got {type(prompt).__name__}; use "
                             "num_images_per_prompt for several pictures")
        frame_prompts = [None] * len(frames) if frame_prompts is None else list(frame_prompts)
        if len(frame_prompts) != len(frames):
            raise ValueError(f"frame_prompts has {len(frame_prompts)} prompts for the {len(frames)} frames "
                             f"{', '.join(frames)} (one each, None for the shared prompt)")
        return [f"{extra}, {prompt}" if extra else prompt for extra in frame_prompts]

    @torch.no_grad()
    def __call__(self, prompt: str, frame_prompts=None, *, foreground=None, background=None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 negative_prompt: str | None = None, guidance_scale: float = 7.5, augment: bool = False,
                 passes_per_batch: int = 1, output_type: str = "pil", return_dict: bool = True, **kwargs):
        """`frame_prompts`: one extra prompt per frame of the mode (`MODES`), or None; `foreground` (RGBA) or
        `background` (RGB or RGBA): PIL image or (1, C, H, W) tensor in [0, 1], already height x width. The other
        arguments are StableDiffusionPipeline's, for `num_images_per_prompt` pictures of all their layers."""
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_size(height, width)
        mode = self.mode(foreground, background)
        frames = MODES[mode]
        texts = self.frame_prompts(prompt, frame_prompts, frames)
        cross_attention_kwargs = None
        if mode != "joint":
            condition = self.condition_image(foreground if mode == "fg2bg" else background, height, width,
                                             needs_alpha=mode == "fg2bg")
            cross_attention_kwargs = {"control_signals": self.attention_sharing.encode_control(condition)}
        embeds, negative = self.encode_prompt(texts, self._execution_device, 1, guidance_scale > 1,
                                              negative_prompt=None if negative_prompt is None
                                              else [negative_prompt] * len(frames))
        latents = StableDiffusionPipeline.__call__(
            self, prompt_embeds=embeds.repeat(num_images_per_prompt, 1, 1),
            negative_prompt_embeds=None if negative is None else negative.repeat(num_images_per_prompt, 1, 1),
            height=height, width=width, guidance_scale=guidance_scale, output_type="latent",
            cross_attention_kwargs=cross_attention_kwargs, **kwargs).images
        framed = latents.unflatten(0, (num_images_per_prompt, len(frames)))  # (b, f, 4, h, w)
        layers = {}
        for f, name in enumerate(frames):
            if name == "foreground":
                rgba = self.transparent_vae().decode(framed[:, f], augment=augment,
                                                     passes_per_batch=passes_per_batch).float()
                layers["foreground"], layers["previews"] = rgba, checkerboard_preview(rgba)
            else:
                decoded = self.vae.decode(framed[:, f] / self.vae.config.scaling_factor).sample
                layers[name] = (decoded.float() * 0.5 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        output = {name: _as(layers[name], output_type) if name in layers else None
                  for name in ("foreground", "background", "blended", "previews")}
        return LayerPipelineOutput(**output) if return_dict else tuple(output.values())

    def save_pretrained(self, save_directory, *args, remote_code: bool = False, **kwargs):
        """The adapter is saved as its own component (the UNet without its processors); `remote_code=True` also
        writes the code, so that `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` needs no hfpapers."""
        processors = self.unet.attn_processors
        patched = {f"{name}.processor" for name in attention_sharing_module_names(self.unet)}
        self.unet.set_attn_processor({k: AttnProcessor2_0() if k in patched else v for k, v in processors.items()})
        try:
            StableDiffusionPipeline.save_pretrained(self, save_directory, *args, **kwargs)
        finally:
            self.unet.set_attn_processor(processors)
        if remote_code:
            write_remote_code(save_directory)
            root, here = Path(save_directory), Path(__file__).resolve()
            sharing = here.with_name("attention_sharing.py")
            for target in (root, root / "attention_sharing"):
                shutil.copy(sharing, target / sharing.name)
            shutil.copy(here, root / here.name)
            index = json.loads((root / "model_index.json").read_text())
            index["_class_name"] = [here.stem, type(self).__name__]
            index["attention_sharing"] = [sharing.stem, "AttentionSharingAdapter"]
            (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _as(images: torch.Tensor, output_type: str):
    """(B, C, H, W) in [0, 1] as the pipelines' `output_type`."""
    if output_type == "pt":
        return images.cpu()
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arrays
    if output_type == "pil":
        return [PIL.Image.fromarray((x * 255).round().astype(np.uint8)) for x in arrays]
    raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
