"""Fine-tuning the diffusion model on transparent latents: the step LayerDiffuse's released UNets come from.

The latent-transparency offset leaves the latent of an RGBA layer decodable by the frozen VAE, so its distribution
stays close to the one the pretrained diffusion model learned, and that model fine-tunes on such latents with its
usual noise-prediction loss [paper abstract; §3 recalled]; its samples then decode to RGBA through the transparent
decoder. The released SDXL weights are such fine-tunes: a rank-256 LoRA on every attention projection
(`layer_xl_transparent_attn`) or weight offsets (`layer_xl_transparent_conv`). Their training code was never
released.

`LayerDiffusionFinetuneRecipe` first trains the transparent VAE (a `LayerDiffusionRecipe` stage through `warm_start`,
with the recipe fields it inherits from it) unless `transparent_vae` names a trained one, then trains the UNet (all
of it, or with `lora_rank` a peft LoRA on q, k, v and out of every attention, as the released attention weights) on
the latents of captioned RGBA layers. The saved folder is a `TransparentStableDiffusionPipeline` with its code: a
prompt in, RGBA out, also where hfpapers is not installed (`DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...engine import Callback, TensorDataset, TrainingArguments, warm_start
from .modeling_layerdiffusion import TransparentVAE, rgba_to_tensor
from .pipeline_layerdiffusion import TransparentStableDiffusionPipeline
from .recipe import LayerDiffusionRecipe

__all__ = ["LayerDiffusionFinetuneRecipe", "TransparentLatentDiffusion", "load_transparent_lora", "fitted_shape_iou"]

# Where a LoRA fine-tune also saves its adapter alone (diffusers' LoRA format), next to the merged pipeline.
LORA_FOLDER = "transparent_lora"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, as `layer_xl_transparent_attn`


class TransparentLatentDiffusion(nn.Module):
    """What the fine-tuning trains: a text-conditioned UNet on the latents of a frozen `TransparentVAE`, with the
    frozen text encoder that conditions it. `save_pretrained` writes the whole text-to-RGBA pipeline."""

    def __init__(self, transparent_vae: TransparentVAE, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.transparent_vae, self.unet, self.text_encoder = transparent_vae, unet, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler  # the training noise schedule
        transparent_vae.requires_grad_(False)
        text_encoder.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder, fresh_unet_seed: int | None = None) -> "TransparentLatentDiffusion":
        """The parts of a fine-tuned folder (or Hub repo); `fresh_unet_seed`: a newly initialised UNet of the same
        config instead of the fine-tuned one (the un-fine-tuned baseline)."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        if fresh_unet_seed is not None:
            torch.manual_seed(fresh_unet_seed)
            unet = UNet2DConditionModel.from_config(unet.config)
        return cls(TransparentVAE.from_pretrained(folder), unet,
                   CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                   CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                   DDPMScheduler.from_pretrained(folder, subfolder="scheduler"))

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (noise, or velocity for a v-prediction schedule) for `noisy_latents`
        (B, 4, h, w) at `timesteps` (B,) under the captions `input_ids` (B, tokens)."""
        with torch.no_grad():
            context = self.text_encoder(input_ids)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=context).sample

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(B, tokenizer max length) ids; a caption longer than the text encoder reads is an error, not cut."""
        limit = self.tokenizer.model_max_length
        for caption in captions:
            if len(self.tokenizer(caption, truncation=True, max_length=limit + 1).input_ids) > limit:
                raise ValueError(f"the caption {caption!r} is longer than the {limit} tokens the text encoder reads")
        return self.tokenizer(captions, padding="max_length", max_length=limit, return_tensors="pt").input_ids

    def pipeline(self, unet=None) -> TransparentStableDiffusionPipeline:
        """The text-to-RGBA pipeline of these parts (sampling with Euler steps on the training noise schedule)."""
        from diffusers import EulerDiscreteScheduler

        vae = self.transparent_vae
        pipe = TransparentStableDiffusionPipeline(
            vae=vae.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet or self.unet,
            scheduler=EulerDiscreteScheduler.from_config(self.scheduler.config),
            transparent_decoder=vae.transparent_decoder, transparent_encoder=vae.transparent_encoder)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, height: int, width: int, generator: torch.Generator,
                 guidance_scale: float, num_inference_steps: int) -> torch.Tensor:
        """Straight RGBA (B, 4, height, width) in [0, 1] generated from the captions `input_ids`."""
        device = self.unet.device
        empty = self.tokenize([""]).expand(len(input_ids), -1)
        return self.pipeline()(prompt_embeds=self.text_encoder(input_ids.to(device))[0],
                               negative_prompt_embeds=self.text_encoder(empty.to(device))[0], height=height,
                               width=width, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                               generator=generator, output_type="pt").images

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """The pipeline with its code; a LoRA is merged into the saved UNet and also saved alone in
        `transparent_lora/` (diffusers' LoRA format, for `load_transparent_lora` onto the same base)."""
        unet = self.unet
        if getattr(unet, "peft_config", None):
            from diffusers import StableDiffusionPipeline
            from peft.utils import get_peft_model_state_dict

            StableDiffusionPipeline.save_lora_weights(
                Path(save_directory, LORA_FOLDER), unet_lora_layers=get_peft_model_state_dict(unet),
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
            unet = copy.deepcopy(unet)
            unet.fuse_lora()
            unet.unload_lora()
        self.pipeline(unet).save_pretrained(save_directory, remote_code=True, **kwargs)


def load_transparent_lora(pipe, folder_or_file) -> None:
    """Add a fine-tune's LoRA (`<folder>/transparent_lora/`, or its `pytorch_lora_weights.safetensors`) to the UNet
    of `pipe`. The adapter is checked against that UNet first: a LoRA trained on another base is one error naming
    what does not fit, and the UNet is left untouched."""
    from safetensors.torch import load_file

    path = Path(folder_or_file)
    if path.is_dir():
        path = path / LORA_FOLDER if (path / LORA_FOLDER).is_dir() else path
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path}; expected a fine-tuned folder with {LORA_FOLDER}/")
    state_dict = load_file(path)
    modules = {}
    for key, tensor in state_dict.items():
        if not key.startswith("unet.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{path}: {key!r} is not a UNet LoRA weight (unet.<module>.lora_A/B.weight)")
        module, _, half = key[len("unet."):].rpartition(".lora_")
        modules.setdefault(module, {})[half] = tensor
    misfits = []
    for module, halves in modules.items():
        try:
            linear = pipe.unet.get_submodule(module)
        except AttributeError:
            misfits.append(f"{module} (not in this UNet)")
            continue
        down, up = halves.get("A.weight"), halves.get("B.weight")
        if (not isinstance(linear, nn.Linear) or down is None or up is None
                or (down.shape[1], up.shape[0]) != (linear.in_features, linear.out_features)):
            misfits.append(f"{module} ({'?' if down is None else down.shape[1]} -> {'?' if up is None else up.shape[0]}"
                           f" vs {getattr(linear, 'in_features', '?')} -> {getattr(linear, 'out_features', '?')})")
    if misfits:
        shown = ", ".join(misfits[:4]) + (f", ... ({len(misfits)} in all)" if len(misfits) > 4 else "")
        raise ValueError(f"the LoRA in {path} was trained on another base: it does not fit this UNet at {shown}")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)


@functools.lru_cache(maxsize=4)
def shape_templates(resolution: int) -> torch.Tensor:
    """(kinds, templates, resolution**2) boolean masks of every shape kind the layers are drawn with, by the layers'
    own renderer at the radii they use, centred on every other pixel (hard edges, thresholded at 0.5). Each kind and
    radius is drawn once, centred on a canvas twice the size, and shifted by whole pixels from there."""
    from ...data.images import SHAPE_KINDS
    from ...data.layers import shape_coverage

    size = resolution
    centres = range(1, size, 2)
    masks = []
    for kind in SHAPE_KINDS:
        drawn = [torch.from_numpy(shape_coverage(kind, 2 * size, size, size, radius) > 0.5)
                 for radius in size * np.linspace(0.12, 0.35, 6)]
        masks.append(torch.stack([d[size - cy:2 * size - cy, size - cx:2 * size - cx]
                                  for d in drawn for cy in centres for cx in centres]))
    return torch.stack(masks).flatten(2)


def fitted_shape_iou(alpha: torch.Tensor) -> torch.Tensor:
    """(B, kinds): for each alpha mask (B, H, W), its IoU with the best-fitting rendered mask of each shape kind
    (the renderer's mask of that kind, placed and sized where it fits best)."""
    templates = shape_templates(alpha.shape[-1]).float()
    masks = alpha.flatten(1).float()
    inter = torch.einsum("bp,knp->bkn", masks, templates)
    union = masks.sum(1)[:, None, None] + templates.sum(2)[None] - inter
    return (inter / union.clamp(min=1)).amax(dim=2)


def prompted_shape(caption: str) -> int:
    """The shape kind a one-shape caption of the embedded layers names ("red circle" -> circle), else -1."""
    from ...data.images import SHAPE_KINDS

    words = caption.split()
    return SHAPE_KINDS.index(words[-1]) if len(words) == 2 and words[-1] in SHAPE_KINDS else -1


_VAE_RECIPE_FIELDS = [f.name for f in fields(LayerDiffusionRecipe)]


@dataclass
class LayerDiffusionFinetuneRecipe(LayerDiffusionRecipe):
    """The transparent VAE's recipe (its fields configure that stage), then the UNet fine-tuned on its latents."""

    finetune_unet: bool = True  # False: the transparent VAE alone, trained as the main run (the sdxl preset)
    transparent_vae: str | None = None  # a trained TransparentVAE (folder or Hub id); None: trained here first
    vae_stage: dict = field(default_factory=dict)  # the training arguments of the transparent-VAE stage
    base_pipeline: str | None = None  # the SD 1.5 pipeline (folder or Hub id) whose UNet is fine-tuned
    unet: dict | None = None  # without base_pipeline: a UNet2DConditionModel config, trained from initialisation
    text_encoder: dict | None = None  # without base_pipeline: CLIPTextConfig values, with hfpapers' character tokenizer
    lora_rank: int = 0  # 0: the whole UNet; > 0: a peft LoRA of this rank on q, k, v, out (the released attn: 256)
    caption_dropout: float = 0.1  # empty captions, so that classifier-free guidance works
    guidance_scale: float = 3.0  # of the generations evaluated
    num_inference_steps: int = 20

    metric = "prompt_alpha_iou"
    columns = ("image", "text")
    processor_class = None

    def check_arguments(self, args: TrainingArguments) -> None:
        unknown = set(self.vae_stage) - (set(TrainingArguments.field_names()) - {"output_dir", "seed"})
        if unknown:
            raise ValueError(f"unknown vae_stage settings {sorted(unknown)}; it takes training arguments (its output "
                             "folder and seed are the run's)")
        if not 0 <= self.caption_dropout < 1 or self.lora_rank < 0:
            raise ValueError(f"caption_dropout must be in [0, 1) and lora_rank at least 0, got {self.caption_dropout} "
                             f"and {self.lora_rank}")
        if self.finetune_unet and self.base_pipeline is None and (self.unet is None or self.text_encoder is None):
            raise ValueError("give base_pipeline (an SD 1.5 folder or Hub id), or unet and text_encoder configs")

    def build_model(self, preset, datasets, args):
        if not self.finetune_unet:
            return super().build_model(preset, datasets, args)
        transparent_vae = self._transparent_vae(preset, datasets, args)
        unet, text_encoder, tokenizer, scheduler = self._diffusion_parts()
        channels = transparent_vae.vae.config.latent_channels
        if unet.config.addition_embed_type is not None or unet.config.in_channels != channels:
            raise ValueError(f"the UNet must be an SD 1.5-style text-conditioned UNet on the VAE's {channels}-channel "
                             "latents (SDXL's size and pooled-text conditioning is not supported by this recipe)")
        if self.lora_rank:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, init_lora_weights="gaussian",
                                        target_modules=list(LORA_TARGETS)))
        self._model = TransparentLatentDiffusion(transparent_vae.eval(), unet, text_encoder.eval(), tokenizer,
                                                 scheduler)
        return self._model, None

    def _transparent_vae(self, preset, datasets, args) -> TransparentVAE:
        if self.transparent_vae is not None:
            return TransparentVAE.from_pretrained(self.transparent_vae)
        recipe = LayerDiffusionRecipe(**{name: getattr(self, name) for name in _VAE_RECIPE_FIELDS})
        training = {"progress_bar": args.progress_bar, **self.vae_stage}
        folder = Path(args.output_dir, "transparent-vae")
        stage_args = TrainingArguments(output_dir=str(folder), seed=args.seed, **training)
        warm_start(folder, lambda: recipe.build_model(preset, datasets, stage_args)[0], datasets, recipe,
                   seed=args.seed, **training)
        return TransparentVAE.from_pretrained(folder)

    def _diffusion_parts(self):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        if self.base_pipeline is not None:
            base = self.base_pipeline
            return (UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
                    CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
                    CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
                    DDPMScheduler.from_pretrained(base, subfolder="scheduler"))
        from ...testing.tiny_diffusion import tiny_clip_tokenizer

        tokenizer = tiny_clip_tokenizer(self.text_encoder["max_position_embeddings"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **self.text_encoder))
        # Stable Diffusion 1.5's noise schedule
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
        return UNet2DConditionModel(**self.unet), text_encoder, tokenizer, scheduler

    def check_eval_dataset(self, model, dataset) -> None:
        self._model = None  # `evaluate_folder` loads the folder's TransparentVAE: its metrics alone are measured

    def prepare_dataset(self, dataset, processor) -> TensorDataset:
        """RGBA layers encoded once into latents with the transparency offset, and their captions' token ids (the
        RGBA alone without a built model, to evaluate a transparent VAE)."""
        model = getattr(self, "_model", None)
        if model is None:
            return super().prepare_dataset(dataset, processor)
        rgba = rgba_to_tensor(list(dataset["image"]))
        captions = list(dataset["text"])
        with torch.no_grad():
            latents = torch.cat([model.transparent_vae.encode(chunk) for chunk in rgba.split(256)])
        return TensorDataset(rgba=rgba, latents=latents, input_ids=model.tokenize(captions),
                             prompted_shape=torch.tensor([prompted_shape(c) for c in captions]))

    def compute_loss(self, model, batch, step_rng, state):
        if not self.finetune_unet:
            return super().compute_loss(model, batch, step_rng, state)
        latents = batch["latents"]
        scheduler = self._model.scheduler
        noise = torch.randn(latents.shape, generator=step_rng).to(latents)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(latents),), generator=step_rng)
        dropped = torch.rand(len(latents), generator=step_rng) < self.caption_dropout
        input_ids = torch.where(dropped[:, None], self._model.tokenize([""]), batch["input_ids"].cpu())
        timesteps, input_ids = timesteps.to(latents.device), input_ids.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise,
                                                                                                     timesteps)
        return F.mse_loss(model(noisy, timesteps, input_ids).float(), target.float())

    def callbacks(self) -> list[Callback]:
        return [_KeepState(self)]

    def eval_outputs(self, model, batch):
        """Every epoch, the noise-prediction error on the held-out latents (fixed draws). After the last epoch (and
        outside a run) also the transparent VAE's own metrics, and for each one-shape caption a layer generated
        from it: the IoU of its alpha with the best-fitting mask of the prompted shape, and whether that shape fits
        best of all ten (generation costs `num_inference_steps` UNet passes, so it is measured once)."""
        wrapped, model = model, getattr(model, "module", model)  # unwrap DistributedDataParallel
        if not isinstance(model, TransparentLatentDiffusion):
            return super().eval_outputs(model, batch)
        generator = torch.Generator().manual_seed(0)
        latents, scheduler = batch["latents"], model.scheduler
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps.to(latents.device))
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(
            latents, noise, timesteps.to(latents.device))
        predicted = wrapped(noisy, timesteps.to(latents.device), batch["input_ids"])
        outputs = {"denoising_mse": (predicted - target).pow(2).flatten(1).mean(1)}
        state = getattr(self, "_state", None)
        if state is not None and state.global_step < state.max_steps:
            return outputs
        outputs.update(super().eval_outputs(model.transparent_vae, {"rgba": batch["rgba"]}))
        shape = batch["prompted_shape"]
        iou = torch.full(shape.shape, math.nan, device=shape.device)
        correct = torch.full(shape.shape, math.nan, device=shape.device)
        known = shape >= 0
        if known.any():
            height, width = batch["rgba"].shape[-2:]
            generated = model.generate(batch["input_ids"][known], height, width, torch.Generator().manual_seed(0),
                                       self.guidance_scale, self.num_inference_steps)
            fits = fitted_shape_iou(generated[:, 3].cpu() > 0.5).to(shape.device)
            iou[known] = fits.gather(1, shape[known][:, None])[:, 0]
            correct[known] = (fits.argmax(1) == shape[known]).float()
        return {**outputs, "prompt_alpha_iou": iou, "prompt_shape_accuracy": correct}

    def compute_metrics(self, outputs):
        # a metric with no value (no one-shape caption in the split) is left out rather than reported as NaN
        return {name: values.float().nanmean().item() for name, values in outputs.items()
                if not values.float().isnan().all()}

    @torch.no_grad()
    def evaluate(self, model: TransparentLatentDiffusion, dataset, batch_size: int = 128) -> dict[str, float]:
        """The eval metrics of `model` on a split of captioned layers, in this process (no engine run)."""
        self._model = model.eval()
        prepared = self.prepare_dataset(dataset, None)
        outputs: dict[str, list] = {}
        for start in range(0, len(prepared), batch_size):
            batch = {k: v[start:start + batch_size] for k, v in prepared.tensors.items()}
            for name, values in self.eval_outputs(model, batch).items():
                outputs.setdefault(name, []).append(values)
        return self.compute_metrics({name: torch.cat(values) for name, values in outputs.items()})


class _KeepState(Callback):
    """Gives the recipe the run's `TrainingState`, so that its evaluation knows the last epoch."""

    def __init__(self, recipe: LayerDiffusionFinetuneRecipe):
        self.recipe = recipe

    def on_train_begin(self, state, model, accelerator) -> None:
        self.recipe._state = state
