"""LayerDiffuse attention sharing for SD1.5 UNets: the `hookers.*` weights of the `layer_sd15_*` models, in diffusers.

LayerDiffuse (Zhang & Agrawala, "Transparent Image Layer Diffusion using Latent Transparency", arXiv 2402.17113)
generates several layers of one picture (foreground, background, blended image) as one batch of "frames" whose
attention is shared. The SD1.5 models patch 32 attention modules, `attn1` and `attn2` of `transformer_blocks.0` in
every spatial transformer. Each patched module

1. adds a per-frame control feature of the condition image to its input (fg2bg / bg2fg models only);
2. runs its own attention with a per-frame LoRA on q, k, v and out (`W0 + up @ down`, LoRA f for frame f), where
   the conditional rows of `attn2` may read a per-frame prompt instead of the shared one (`cond_overwrite`);
3. adds a "temporal" attention across the frames at each spatial token (LayerNorm -> `temporal_i` -> q, k, v ->
   attention over the frames -> `temporal_o`) as a residual;
4. returns the change it made to its input; the transformer block adds it back as its usual residual.

Batch layout `(b f)`: row `i * frames + f` is frame f of picture i. The batch size must be a multiple of `frames`.
diffusers' classifier-free guidance, `cat([uncond, cond])` of two such batches, keeps the layout.

Released files (HF `LayerDiffusion/layerdiffusion-v1`), loaded with `load_attention_sharing`:

- `layer_sd15_transparent_attn`: frames=1 (transparent foreground only);
- `layer_sd15_joint`: frames=3 (foreground, background, blended), per-frame prompts through `cond_overwrite`;
- `layer_sd15_fg2bg`: frames=2 (background, blended) given the foreground image as control;
- `layer_sd15_bg2fg`: frames=2 (foreground, blended) given the background image as control.

Per-call inputs go through the UNet's `cross_attention_kwargs` (Forge keeps them in its transformer options):

- `cond_overwrite`: a list with one prompt embedding (or None) per frame, shape `(1 or b, tokens, dim)`; as every
  cross-attention of an SD1.5 UNet is patched, this equals giving those rows that prompt in `encoder_hidden_states`;
- `cond_mark`: one value per batch row, Forge's convention: 0 for a conditional row, 1 for an unconditional one
  (`diffusers_cond_mark` builds it for diffusers' `[uncond, cond]` order); required with `cond_overwrite`;
- `control_signals`: `adapter.encode_control(image)`, required by the control models.

The processors are `nn.Module`s held by the adapter under the released key names; diffusers' `Attention` registers
them as submodules too, so they follow `unet.to(...)` and appear in `unet.state_dict()`. Attention masks are not
supported (SD1.5 pipelines pass none). Reference: `lib_layerdiffusion/attention_sharing.py` of
lllyasviel/sd-forge-layerdiffuse; the diffusers names of the 32 modules follow rootonchair/diffuser_layerdiffuse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from torch import nn

__all__ = [
    "FrameLoRA",
    "AttentionSharingProcessor",
    "AdditionalAttentionCondsEncoder",
    "AttentionSharingAdapter",
    "attention_sharing_module_names",
    "load_attention_sharing",
    "diffusers_cond_mark",
]

CONTROL_CHANNELS = 256  # width of the condition-image features


class FrameLoRA(nn.Module):
    """One frame's low-rank update of a Linear layer of the attention module: weight `W0 + up @ down`, bias W0's."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.up.weight)  # a fresh LoRA leaves the layer unchanged

    def forward(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        return F.linear(x, base.weight + self.up.weight @ self.down.weight, base.bias)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, L, heads*hd) -> (B, heads, L, hd)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


def _control_conv(hidden_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(CONTROL_CHANNELS, CONTROL_CHANNELS, kernel_size=3, padding=1),
        nn.SiLU(),
        nn.Conv2d(CONTROL_CHANNELS, hidden_size, kernel_size=1),
    )


class AttentionSharingProcessor(nn.Module):
    """diffusers attention processor of one patched module (`hookers.layers.{i}` in the released files).

    `hidden_size` is the attention width (SD1.5 needs `inner_dim == query_dim`), `context_dim` the width of what
    keys and values read: `hidden_size` for `attn1`, the text width for `attn2`.
    """

    def __init__(self, hidden_size: int, context_dim: int, frames: int, rank: int, use_control: bool = False):
        super().__init__()
        self.hidden_size, self.context_dim, self.frames = hidden_size, context_dim, frames

        def loras(in_features: int) -> nn.ModuleList:
            return nn.ModuleList(FrameLoRA(in_features, hidden_size, rank) for _ in range(frames))

        self.to_q_lora, self.to_k_lora = loras(hidden_size), loras(context_dim)
        self.to_v_lora, self.to_out_lora = loras(context_dim), loras(hidden_size)

        self.temporal_i = nn.Linear(hidden_size, hidden_size)
        self.temporal_n = nn.LayerNorm(hidden_size, eps=1e-6)
        self.temporal_q = nn.Linear(hidden_size, hidden_size)
        self.temporal_k = nn.Linear(hidden_size, hidden_size)
        self.temporal_v = nn.Linear(hidden_size, hidden_size)
        self.temporal_o = nn.Linear(hidden_size, hidden_size)
        # Zero output layers: a fresh processor computes exactly the original attention.
        nn.init.zeros_(self.temporal_o.weight)
        nn.init.zeros_(self.temporal_o.bias)

        self.control_convs = None
        if use_control:
            self.control_convs = nn.ModuleList(_control_conv(hidden_size) for _ in range(frames))
            for conv in self.control_convs:
                nn.init.zeros_(conv[2].weight)
                nn.init.zeros_(conv[2].bias)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cond_overwrite: Sequence[torch.Tensor | None] | None = None,
        cond_mark: torch.Tensor | None = None,
        control_signals: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        rows, tokens, _ = hidden_states.shape
        if rows % self.frames:
            raise ValueError(
                f"LayerDiffuse attention sharing with {self.frames} frames needs a batch of whole groups of "
                f"{self.frames} frames (layout (b f)), got a batch of {rows} rows; generate a multiple of "
                f"{self.frames} images (otherwise the frames mix across pictures and the result is noise)")
        if attention_mask is not None:
            raise NotImplementedError("LayerDiffuse attention sharing does not support attention masks")

        framed = hidden_states.unflatten(0, (-1, self.frames))  # (b, f, tokens, c)
        control = None
        if self.control_convs is not None:
            control = self._control(control_signals, tokens, framed)
            framed = framed + control

        if encoder_hidden_states is None:
            context = framed  # attn1 reads the control-shifted input, as in the reference
        else:
            context = self._framed_context(attn, encoder_hidden_states, cond_overwrite, cond_mark)

        attn_out = torch.stack(
            [self._frame_attention(attn, f, framed[:, f], context[:, f]) for f in range(self.frames)], dim=1)
        # The reference returns (h + control + attn_out + temporal) - h; summing the terms keeps exactness.
        delta = attn_out + self._temporal_attention(framed + attn_out, attn.heads)
        if control is not None:
            delta = delta + control
        return delta.flatten(0, 1)

    def _framed_context(self, attn, encoder_hidden_states, cond_overwrite, cond_mark) -> torch.Tensor:
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context = encoder_hidden_states.unflatten(0, (-1, self.frames))
        if not any(c is not None for c in cond_overwrite or ()):
            return context
        if cond_mark is None:
            raise ValueError("cond_overwrite needs cond_mark (0 for conditional rows, 1 for unconditional ones) "
                             "to leave the unconditional branch alone; see diffusers_cond_mark")
        if len(cond_overwrite) > self.frames:
            raise ValueError(f"cond_overwrite has {len(cond_overwrite)} prompts for {self.frames} frames")
        is_cond = (cond_mark.to(context.device) == 0).reshape(-1, self.frames)[..., None, None]  # (b, f, 1, 1)
        frames = []
        for f in range(self.frames):
            overwrite = cond_overwrite[f] if f < len(cond_overwrite) else None
            frames.append(context[:, f] if overwrite is None else
                          torch.where(is_cond[:, f], overwrite.to(context), context[:, f]))
        return torch.stack(frames, dim=1)

    def _control(self, control_signals, tokens: int, framed: torch.Tensor) -> torch.Tensor:
        if control_signals is None:
            raise ValueError("this LayerDiffuse model (fg2bg / bg2fg) needs its condition image: pass "
                             "cross_attention_kwargs={'control_signals': adapter.encode_control(image)}")
        if tokens not in control_signals:
            raise ValueError(f"no control signal for a {tokens}-token feature map (have {sorted(control_signals)}): "
                             "the condition image must be 8x the latent size")
        signal = control_signals[tokens].to(framed)
        if signal.shape[0] not in (1, framed.shape[0]):
            raise ValueError(f"control signals for {signal.shape[0]} images cannot serve {framed.shape[0]} groups of "
                             "frames (give 1 image, or one per group: UNet batch / frames)")
        return torch.stack([conv(signal).flatten(2).transpose(1, 2) for conv in self.control_convs], dim=1)

    def _frame_attention(self, attn, f: int, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.to_q_lora[f](hidden, attn.to_q), attn.heads)
        k = _split_heads(self.to_k_lora[f](context, attn.to_k), attn.heads)
        v = _split_heads(self.to_v_lora[f](context, attn.to_v), attn.heads)
        out = _merge_heads(F.scaled_dot_product_attention(q, k, v))
        return attn.to_out[1](self.to_out_lora[f](out, attn.to_out[0]))  # to_out[1] is the dropout

    def _temporal_attention(self, framed: torch.Tensor, heads: int) -> torch.Tensor:
        b, f, tokens, c = framed.shape
        x = self.temporal_i(self.temporal_n(framed))
        x = x.transpose(1, 2).reshape(b * tokens, f, c)  # each spatial token attends over its f frames
        q, k, v = (_split_heads(layer(x), heads) for layer in (self.temporal_q, self.temporal_k, self.temporal_v))
        x = self.temporal_o(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x.reshape(b, tokens, f, c).transpose(1, 2)


def _conv_silu_stack(*layers: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(*(m for c_in, c_out, stride in layers
                           for m in (nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1), nn.SiLU())))


class AdditionalAttentionCondsEncoder(nn.Module):
    """Condition-image encoder of the fg2bg / bg2fg models: 256-channel features at 1/8, 1/16, 1/32 and 1/64 of
    the image, keyed by their number of pixels (H*W), which is how a patched module finds its own resolution."""

    def __init__(self):
        super().__init__()
        width = CONTROL_CHANNELS
        self.blocks_0 = _conv_silu_stack((3, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2),
                                         (128, 128, 1), (128, width, 2), (width, width, 1))
        self.blocks_1 = _conv_silu_stack((width, width, 2), (width, width, 1))
        self.blocks_2 = _conv_silu_stack((width, width, 2), (width, width, 1))
        self.blocks_3 = _conv_silu_stack((width, width, 2), (width, width, 1))

    def forward(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        features, h = {}, image
        for block in (self.blocks_0, self.blocks_1, self.blocks_2, self.blocks_3):
            h = block(h)
            features[h.shape[2] * h.shape[3]] = h
        return features


def attention_sharing_module_names(unet: UNet2DConditionModel) -> list[str]:
    """The patched modules in the reference's `hookers.layers` order: `attn1`, `attn2` of `transformer_blocks.0` of
    every spatial transformer, down blocks first, then up blocks, then the mid block (32 for SD1.5)."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    blocks += [("mid_block", unet.mid_block)]
    return [f"{prefix}.attentions.{j}.transformer_blocks.0.attn{k}"
            for prefix, block in blocks
            for j, transformer in enumerate(getattr(block, "attentions", None) or [])
            if hasattr(transformer, "transformer_blocks")
            for k in (1, 2)]


def _sharing_dims(name: str, attn: Attention) -> tuple[int, int]:
    """(hidden_size, context_dim) of an attention module the processor can replace."""
    if (attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None
            or attn.residual_connection or attn.rescale_output_factor != 1.0):
        raise ValueError(f"{name} is not a plain SD attention module (group/spatial/qk norm, residual or "
                         "rescaled output): LayerDiffuse attention sharing does not apply to it")
    if attn.to_q.in_features != attn.to_q.out_features:
        raise ValueError(f"{name} has query_dim {attn.to_q.in_features} != inner_dim {attn.to_q.out_features}; "
                         "LayerDiffuse attention sharing needs them equal")
    return attn.to_q.out_features, attn.to_k.in_features


class AttentionSharingAdapter(ModelMixin, ConfigMixin):
    """The processors of the patched modules, with the released files' key names: `hookers.layers.{i}.*` for
    processor i (module `module_names[i]`) and `kwargs_encoder.*` for the condition-image encoder.

    Build it for a UNet with `from_unet` (or load a released file with `load_attention_sharing`), then `install` it.
    """

    @register_to_config
    def __init__(
        self,
        frames: int = 1,
        rank: int = 256,
        module_names: Sequence[str] = (),
        hidden_sizes: Sequence[int] = (),
        context_dims: Sequence[int] = (),
        use_control: bool = False,
    ):
        super().__init__()
        if not len(module_names) == len(hidden_sizes) == len(context_dims):
            raise ValueError("module_names, hidden_sizes and context_dims must have one entry per patched module")
        layers = [AttentionSharingProcessor(hidden, context, frames, rank, use_control)
                  for hidden, context in zip(hidden_sizes, context_dims)]
        self.hookers = nn.ModuleDict({"layers": nn.ModuleList(layers)})  # key names of the released files
        self.kwargs_encoder = AdditionalAttentionCondsEncoder() if use_control else None

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, frames: int = 1, rank: int = 256,
                  use_control: bool = False) -> "AttentionSharingAdapter":
        names = attention_sharing_module_names(unet)
        dims = [_sharing_dims(name, unet.get_submodule(name)) for name in names]
        return cls(frames=frames, rank=rank, module_names=names, hidden_sizes=[h for h, _ in dims],
                   context_dims=[c for _, c in dims], use_control=use_control)

    @property
    def processors(self) -> list[AttentionSharingProcessor]:
        return list(self.hookers["layers"])

    def install(self, unet: UNet2DConditionModel) -> None:
        """Set the processors on the UNet's patched modules (checked against the UNet's shapes)."""
        names = attention_sharing_module_names(unet)
        if names != list(self.config.module_names):
            raise ValueError(f"this adapter patches {len(self.config.module_names)} modules "
                             f"{list(self.config.module_names)[:4]}..., the UNet has {len(names)}: {names[:4]}...")
        for name, processor in zip(names, self.processors):
            attn = unet.get_submodule(name)
            if _sharing_dims(name, attn) != (processor.hidden_size, processor.context_dim):
                raise ValueError(f"{name}: the UNet's (hidden_size, context_dim) {_sharing_dims(name, attn)} do not "
                                 f"match the adapter's {(processor.hidden_size, processor.context_dim)}")
            attn.set_processor(processor)

    @torch.no_grad()
    def encode_control(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """Control signals of a condition image `(B, 3, H, W)` in [0, 1] (RGB composited on gray, H and W 8x the
        latent size), for `cross_attention_kwargs={'control_signals': ...}`; B is 1 or the UNet batch / frames."""
        if self.kwargs_encoder is None:
            raise ValueError("this LayerDiffuse adapter has no control path (only the fg2bg / bg2fg models have one)")
        return self.kwargs_encoder(image.to(device=self.device, dtype=self.dtype) * 2.0 - 1.0)


_LORA_KEY = re.compile(r"hookers\.layers\.0\.to_q_lora\.(\d+)\.down\.weight")
_LAYER_KEY = re.compile(r"hookers\.layers\.(\d+)\.")


def _list_keys(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_attention_sharing(unet: UNet2DConditionModel,
                           state_dict: Mapping[str, torch.Tensor]) -> AttentionSharingAdapter:
    """Load a released `layer_sd15_*` attention-sharing state dict (`hookers.*`, `kwargs_encoder.*`) into a new
    adapter, install its processors on `unet` and return it. Frames, rank and whether the file has a control path
    are read from the keys; any missing, unknown or mis-shaped key raises a ValueError listing them."""
    frame_ids = [int(m.group(1)) for key in state_dict if (m := _LORA_KEY.fullmatch(key))]
    if not frame_ids:
        raise ValueError("not a LayerDiffuse attention-sharing state dict: no "
                         "'hookers.layers.0.to_q_lora.{f}.down.weight' key")
    frames = max(frame_ids) + 1
    rank = state_dict["hookers.layers.0.to_q_lora.0.down.weight"].shape[0]
    use_control = any(".control_convs." in key or key.startswith("kwargs_encoder.") for key in state_dict)

    layers = 1 + max(int(m.group(1)) for key in state_dict if (m := _LAYER_KEY.match(key)))
    names = attention_sharing_module_names(unet)
    if layers != len(names):
        raise ValueError(f"the state dict patches {layers} attention modules, the UNet has {len(names)} "
                         "(attn1 and attn2 of transformer_blocks.0 in each of its spatial transformers; SD1.5 has 32)")

    adapter = AttentionSharingAdapter.from_unet(unet, frames=frames, rank=rank, use_control=use_control)
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{what}: {_list_keys(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)) if keys]
    if problems:
        raise ValueError(f"state dict does not fit a {frames}-frame, rank-{rank} LayerDiffuse adapter for this UNet; "
                         + "; ".join(problems))
    adapter.load_state_dict(state_dict)
    nn.Module.to(adapter, device=unet.device, dtype=unet.dtype)  # ModelMixin.to warns on any dtype cast
    adapter.install(unet)
    return adapter


def diffusers_cond_mark(batch_size: int, do_classifier_free_guidance: bool = True) -> torch.Tensor:
    """Forge's `cond_mark` (0 = conditional row, 1 = unconditional) for a diffusers UNet batch: `[uncond, cond]`
    halves of `batch_size` rows each under classifier-free guidance, else `batch_size` conditional rows."""
    mark = torch.zeros(batch_size)
    return torch.cat([torch.ones(batch_size), mark]) if do_classifier_free_guidance else mark
