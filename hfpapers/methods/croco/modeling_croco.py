"""CroCo / CroCo v2: cross-view completion pre-training (Weinzaepfel et al., arXiv 2210.10716 and 2211.10408).

Two views of one scene go through one ViT encoder: view 1 with most of its patches masked (only the visible
ones are encoded), view 2 whole. A decoder fills view 1's masked slots with a learned token and reconstructs them
from its visible patches and from view 2, through blocks of self-attention, cross-attention to view 2's tokens
and an MLP. Positions enter as fixed 2D sin-cos embeddings (CroCo v1) or as 2D rotary embeddings of every
query and key (CroCo v2, base 100). Written from the papers and the released checkpoints' layout (the official
code is CC BY-NC-SA 4.0); attention runs through `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import DepthEstimatorOutput
from transformers.utils import ModelOutput

from .configuration_croco import CroCoConfig


def grid_positions(height: int, width: int, device=None) -> torch.Tensor:
    """(height * width, 2) integer (y, x) position of every patch, in row-major token order."""
    y, x = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([y.flatten(), x.flatten()], dim=-1)


def sincos_position_embedding(dim: int, height: int, width: int) -> torch.Tensor:
    """(height * width, dim) fixed 2D sin-cos embedding (MAE's): the first half encodes the column, the second
    the row, each as [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (dim / 4)). Float64, rounded to float32
    as the released models store it."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    positions = grid_positions(height, width).to(torch.float64)

    def embed(p):
        angles = p[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(positions[:, 1]), embed(positions[:, 0])], dim=1).float()


class RotaryEmbedding2D:
    """2D RoPE of CroCo v2: a head's first half is rotated by the patch row, its second half by the column, each
    with 1D RoPE in the rotate-half convention, frequencies base^(-2k / (head_dim / 2)).

    The angles are computed in float32 and then cast, as the released models were trained."""

    def __init__(self, head_dim: int, base: float):
        self.half, self.base = head_dim // 2, base

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (batch, tokens, 2) -> cos and signed sin of shape (batch, 1, tokens, head_dim), for `rotate`
        (computed once per forward and shared by every attention on those positions)."""
        exponents = torch.arange(0, self.half, 2, dtype=torch.float32, device=positions.device) / self.half
        inv_freq = 1.0 / self.base ** exponents
        angles = [positions[..., axis].float()[..., None] * inv_freq for axis in (0, 1)]
        angles = torch.cat([torch.cat([a, a], dim=-1) for a in angles], dim=-1).to(dtype)[:, None]
        # rotate_half(x) * sin = swap(x) * (sign * sin), with swap exchanging the quarters of each half and sign
        # -1 on the first quarter of each half
        sign = torch.ones(4, self.half // 2, dtype=dtype, device=positions.device)
        sign[0::2] = -1
        return angles.cos(), angles.sin() * sign.flatten()

    @staticmethod
    def rotate(tokens: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """tokens (batch, heads, tokens, head_dim) -> tokens * cos + rotate_half(each half) * sin, in two passes
        (the swap of quarters is one copy; no negation or concatenation)."""
        swapped = tokens.unflatten(-1, (2, 2, -1)).flip(-2).flatten(-3)
        return torch.addcmul(tokens * cos, swapped, signed_sin)


class CroCoMLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(width, int(width * ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(width * ratio), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, tokens, width) -> (batch, heads, tokens, width / heads)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _attend(q, k, v, rope, proj: nn.Linear) -> torch.Tensor:
    if rope is not None:
        (cos_q, sin_q), (cos_k, sin_k) = rope
        q, k = RotaryEmbedding2D.rotate(q, cos_q, sin_q), RotaryEmbedding2D.rotate(k, cos_k, sin_k)
    return proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class CroCoSelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)  # fused, as the released checkpoints store it
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        q, k, v = (_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return _attend(q, k, v, None if rope is None else (rope, rope), self.proj)


class CroCoCrossAttention(nn.Module):
    """Queries from view 1's decoder tokens, keys and values from view 2's (which the decoder never updates)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(width, width)
        self.projk = nn.Linear(width, width)
        self.projv = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, rope_x=None, rope_memory=None) -> torch.Tensor:
        q = _heads(self.projq(x), self.num_heads)
        k, v = _heads(self.projk(memory), self.num_heads), _heads(self.projv(memory), self.num_heads)
        return _attend(q, k, v, None if rope_x is None else (rope_x, rope_memory), self.proj)


class CroCoEncoderBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: CroCoConfig):
        super().__init__()
        width = config.hidden_size
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = CroCoSelfAttention(width, config.num_attention_heads)
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = CroCoMLP(width, config.mlp_ratio)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class CroCoDecoderBlock(GradientCheckpointingLayer):
    """x + self_attn(norm1(x)); x + cross_attn(norm2(x), norm_y(view 2)); x + mlp(norm3(x))."""

    def __init__(self, config: CroCoConfig):
        super().__init__()
        width, heads, eps = config.decoder_hidden_size, config.decoder_num_attention_heads, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = CroCoSelfAttention(width, heads)
        self.cross_attn = CroCoCrossAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.norm3 = nn.LayerNorm(width, eps=eps)
        self.mlp = CroCoMLP(width, config.mlp_ratio)
        self.norm_y = nn.LayerNorm(width, eps=eps) if config.norm_reference_in_decoder else nn.Identity()

    def forward(self, x: torch.Tensor, memory: torch.Tensor, rope_x=None, rope_memory=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope_x)
        x = x + self.cross_attn(self.norm2(x), self.norm_y(memory), rope_x, rope_memory)
        return x + self.mlp(self.norm3(x))


@dataclass
class CroCoModelOutput(ModelOutput):
    """last_hidden_state (batch, patches, hidden_size): the encoder's normalised features of `pixel_values`;
    reference_last_hidden_state: those of `reference_pixel_values` when given; hidden_states: the embeddings and
    every block's output for `pixel_values` (the last one before the final norm)."""

    last_hidden_state: torch.Tensor | None = None
    reference_last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    reference_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CroCoForPretrainingOutput(ModelOutput):
    """loss: normalised-patch MSE over view 1's masked patches; logits (batch, patches, patch_size**2 * 3): the
    predicted patches in (row, column, channel) order; mask (batch, patches): True where view 1 was masked;
    hidden_states: the encoder's for view 1's visible patches; decoder_hidden_states: every decoder block's output."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch, channels, H, W) -> (batch, patches, patch_size**2 * channels), each patch in (row, column, channel)
    order (the released prediction head's layout)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size ** 2 * c)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: (batch, patches, patch_size**2 * channels) -> (batch, channels, height, width)."""
    b, gh, gw = patches.shape[0], height // patch_size, width // patch_size
    x = patches.reshape(b, gh, gw, patch_size, patch_size, -1)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, height, width)


def patch_errors(prediction: torch.Tensor, target: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """(batch, patches) squared error of each predicted patch, averaged over its values; with `norm_pix` each
    target patch is first standardised by its own mean and (unbiased) variance + 1e-6."""
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # bf16 logits (autocast) in fp32, fp64 kept
    return (prediction.to(dtype) - target.to(dtype)).pow(2).mean(-1)


def normalized_patch_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         norm_pix: bool = True) -> torch.Tensor:
    """The pre-training loss: `patch_errors` averaged over the masked patches only."""
    return (patch_errors(prediction, target, norm_pix) * mask).sum() / mask.sum()


def random_mask(batch: int, num_patches: int, num_masked: int, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """(batch, num_patches) bool, True on `num_masked` uniformly random patches per row. Drawn as the official
    `RandomMask` (`argsort(rand) < num_masked`), so one seed gives the official code's mask."""
    noise = torch.rand(batch, num_patches, generator=generator,
                       device=generator.device if generator is not None else device)
    return (noise.argsort(dim=1) < num_masked).to(device)


class CroCoPreTrainedModel(PreTrainedModel):
    config_class = CroCoConfig
    base_model_prefix = "croco"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CroCoEncoderBlock", "CroCoDecoderBlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # the official initialisation (MAE's): Xavier-uniform linears with zero bias, the patch projection
        # Xavier-uniform as a (out, in * p * p) matrix, the mask token N(0, 0.02)
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            init.uniform_(module.weight, -bound, bound)
            init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))  # PyTorch's default
        elif isinstance(module, CroCoForPretraining):
            init.normal_(module.mask_token, std=self.config.initializer_range)

    def _check_views(self, pixel_values, reference_pixel_values=None, need_reference: bool = False):
        """Both views as normalised RGB batches of one size, a multiple of the patch size, in the model's dtype."""
        views = {"pixel_values": pixel_values}
        if reference_pixel_values is not None or need_reference:
            if reference_pixel_values is None:
                raise ValueError(f"{type(self).__name__} needs reference_pixel_values, the second view (batch, 3, "
                                 "height, width) of the scene of pixel_values")
            views["reference_pixel_values"] = reference_pixel_values
        p = self.config.patch_size
        for name, x in views.items():
            if not torch.is_tensor(x):
                raise ValueError(f"{name} must be a tensor (batch, 3, height, width), got {type(x).__name__}")
            if x.dim() != 4 or x.shape[1] != 3:
                hint = " (a grayscale image: convert it to RGB)" if x.dim() == 4 and x.shape[1] == 1 else ""
                raise ValueError(f"{name} must be RGB images of shape (batch, 3, height, width), got "
                                 f"{tuple(x.shape)}{hint}")
            if not x.is_floating_point():
                raise ValueError(f"{name} must be floating point, normalised by the image processor; got {x.dtype}")
            if x.shape[0] == 0:
                raise ValueError(f"{name} is an empty batch, shape {tuple(x.shape)}; pass at least one image")
            if x.shape[2] % p or x.shape[3] % p:
                raise ValueError(f"{name} is {x.shape[2]}x{x.shape[3]}; height and width must be multiples of "
                                 f"patch_size={p} (resize with the model's image processor)")
            # NaN makes both extremes NaN, an inf is one of them: one pass, no mask (skipped while torch.compile
            # traces: a data-dependent branch would break the graph)
            if not torch.compiler.is_compiling() and not torch.isfinite(torch.stack(torch.aminmax(x))).all():
                raise ValueError(f"{name} contain NaN or infinite values; expected finite, normalised pixels")
        if len(views) == 2 and pixel_values.shape != reference_pixel_values.shape:
            raise ValueError(f"the two views must be the same size and batch: pixel_values {tuple(pixel_values.shape)}"
                             f" but reference_pixel_values {tuple(reference_pixel_values.shape)}")
        return tuple(x.to(self.dtype) for x in views.values())


class CroCoModel(CroCoPreTrainedModel):
    """The siamese ViT encoder: `patch_embed` (a p x p convolution), pre-norm blocks, `enc_norm`."""

    def __init__(self, config: CroCoConfig):
        super().__init__(config)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.enc_blocks = nn.ModuleList(CroCoEncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.enc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rope = (RotaryEmbedding2D(config.hidden_size // config.num_attention_heads, config.rope_base)
                     if config.position_embedding == "rope" else None)
        self.post_init()

    def encode(self, pixel_values: torch.Tensor, mask: torch.Tensor | None = None,
               output_hidden_states: bool = False):
        """Features of the patches of `pixel_values` (batch, 3, H, W) not in `mask` (batch, patches; True =
        masked, the same count per row): (features (batch, visible, hidden_size), positions (batch, visible, 2),
        hidden states or None)."""
        x = self.patch_embed.proj(pixel_values)
        gh, gw = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if self.rope is None:
            x = x + sincos_position_embedding(self.config.hidden_size, gh, gw).to(x)
        positions = grid_positions(gh, gw, x.device).expand(x.shape[0], -1, -1)
        if mask is not None:
            x = x[~mask].view(x.shape[0], -1, x.shape[-1])
            positions = positions[~mask].view(x.shape[0], -1, 2)
        rope = None if self.rope is None else self.rope.cos_sin(positions, x.dtype)
        hidden = (x,) if output_hidden_states else None
        for block in self.enc_blocks:
            x = block(x, rope)
            if output_hidden_states:
                hidden += (x,)
        return self.enc_norm(x), positions, hidden

    def forward(self, pixel_values: torch.Tensor, reference_pixel_values: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CroCoModelOutput | tuple:
        """pixel_values (and optionally reference_pixel_values, a second view of the same size): (batch, 3, H, W)
        normalised images, H and W multiples of the patch size. Nothing is masked."""
        views = self._check_views(pixel_values, reference_pixel_values)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        features, _, hidden = self.encode(views[0], output_hidden_states=output_hidden_states)
        out = CroCoModelOutput(last_hidden_state=features, hidden_states=hidden)
        if len(views) == 2:
            out.reference_last_hidden_state, _, out.reference_hidden_states = self.encode(
                views[1], output_hidden_states=output_hidden_states)
        return out if return_dict else out.to_tuple()


class CroCoDecoder(nn.Module):
    """`embed` (encoder -> decoder width, applied to both views), the decoder blocks and the final `norm`."""

    def __init__(self, config: CroCoConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.hidden_size, config.decoder_hidden_size)
        self.blocks = nn.ModuleList(CroCoDecoderBlock(config) for _ in range(config.decoder_num_hidden_layers))
        self.norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.rope = (RotaryEmbedding2D(config.decoder_hidden_size // config.decoder_num_attention_heads,
                                       config.rope_base) if config.position_embedding == "rope" else None)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, grid: tuple[int, int],
                output_hidden_states: bool = False):
        """x: view 1's embedded tokens at every patch (batch, patches, decoder width); memory: view 2's embedded
        tokens. Returns the normalised output and every block's output (or None)."""
        positions = grid_positions(*grid, x.device)[None]
        rope = None
        if self.rope is None:
            position_embedding = sincos_position_embedding(self.config.decoder_hidden_size, *grid).to(x)
            x, memory = x + position_embedding, memory + position_embedding
        else:
            rope = self.rope.cos_sin(positions, x.dtype)  # both views sit on the same grid
        hidden = () if output_hidden_states else None
        for block in self.blocks:
            x = block(x, memory, rope, rope)
            if output_hidden_states:
                hidden += (x,)
        return self.norm(x), hidden


class CroCoForPretraining(CroCoPreTrainedModel):
    """Cross-view completion: encoder on view 1's visible patches and on view 2, `mask_token` in view 1's masked
    slots, the decoder, and `prediction_head` (decoder width -> patch_size**2 * 3 pixels)."""

    def __init__(self, config: CroCoConfig):
        super().__init__(config)
        self.croco = CroCoModel(config)
        self.decoder = CroCoDecoder(config)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_hidden_size))
        self.prediction_head = nn.Linear(config.decoder_hidden_size, config.patch_size ** 2 * 3)
        self.post_init()

    def _mask(self, mask, batch: int, num_patches: int, generator, device) -> torch.Tensor:
        num_masked = int(self.config.mask_ratio * num_patches)
        if mask is None:
            if not self.training:  # the same mask for every image: evaluation is deterministic, batch-independent
                row = random_mask(1, num_patches, num_masked, torch.Generator().manual_seed(self.config.eval_mask_seed))
                return row.expand(batch, -1).to(device)
            return random_mask(batch, num_patches, num_masked, generator, device)
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, num_patches):
            got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor (batch, patches) = ({batch}, {num_patches}), True where "
                             f"view 1 is masked; got {got}" + (f" of {mask.dtype}" if torch.is_tensor(mask) else ""))
        counts = mask.sum(1)
        if not torch.compiler.is_compiling() and (not (counts == counts[0]).all() or counts[0] in (0, num_patches)):
            raise ValueError(f"mask must mask the same number of patches in every image, at least one and not all; "
                             f"got counts {counts.tolist()} of {num_patches}")
        return mask.to(device)

    def forward(self, pixel_values: torch.Tensor, reference_pixel_values: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CroCoForPretrainingOutput | tuple:
        """pixel_values: view 1 (batch, 3, H, W), reference_pixel_values: view 2 (same shape), both normalised.
        mask (batch, patches) bool, True = masked; without it, training draws `int(mask_ratio * patches)` random
        patches per image (from `generator` if given) and eval mode uses one seeded mask (`eval_mask_seed`)."""
        image, reference = self._check_views(pixel_values, reference_pixel_values, need_reference=True)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        p = self.config.patch_size
        grid = (image.shape[2] // p, image.shape[3] // p)
        mask = self._mask(mask, image.shape[0], grid[0] * grid[1], generator, image.device)
        visible, _, hidden = self.croco.encode(image, mask, output_hidden_states)
        memory, _, _ = self.croco.encode(reference)
        visible, memory = self.decoder.embed(visible), self.decoder.embed(memory)
        tokens = self.mask_token.to(visible.dtype).expand(mask.shape[0], mask.shape[1], -1).clone()
        tokens[~mask] = visible.reshape(-1, visible.shape[-1])
        decoded, decoder_hidden = self.decoder(tokens, memory, grid, output_hidden_states)
        logits = self.prediction_head(decoded)
        loss = normalized_patch_mse(logits, patchify(image, p), mask, self.config.norm_pix_loss)
        out = CroCoForPretrainingOutput(loss=loss, logits=logits, mask=mask, hidden_states=hidden,
                                        decoder_hidden_states=decoder_hidden)
        return out if return_dict else out.to_tuple()


class CroCoForDepthEstimation(CroCoPreTrainedModel):
    """A binocular dense head on the pre-trained network (as CroCo's downstream models): both views encoded whole,
    the decoder, then `depth_head` (decoder width -> patch_size**2 values per patch) gives view 1's relative depth.

    Relative depth: the depth map standardised per image (zero mean, unit variance), which a pair fixes up to the
    unknown scale of the scene; `labels` (batch, H, W) are standardised the same way for the MSE loss."""

    def __init__(self, config: CroCoConfig):
        super().__init__(config)
        self.croco = CroCoModel(config)
        self.decoder = CroCoDecoder(config)
        self.depth_head = nn.Linear(config.decoder_hidden_size, config.patch_size ** 2)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, reference_pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> DepthEstimatorOutput | tuple:
        """pixel_values: the view whose depth is predicted, reference_pixel_values: a second view of the scene
        (both (batch, 3, H, W)). predicted_depth: (batch, H, W) relative depth."""
        image, reference = self._check_views(pixel_values, reference_pixel_values, need_reference=True)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        p, (h, w) = self.config.patch_size, image.shape[2:]
        features, _, _ = self.croco.encode(image)
        memory, _, _ = self.croco.encode(reference)
        decoded, hidden = self.decoder(self.decoder.embed(features), self.decoder.embed(memory), (h // p, w // p),
                                       output_hidden_states)
        depth = unpatchify(self.depth_head(decoded), p, h, w)[:, 0]
        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(depth.shape):
                raise ValueError(f"labels must be depth maps (batch, height, width) = {tuple(depth.shape)}, got "
                                 f"{tuple(labels.shape)}")
            loss = F.mse_loss(depth, standardize_depth(labels.to(depth.dtype)))
        out = DepthEstimatorOutput(loss=loss, predicted_depth=depth, hidden_states=hidden)
        return out if return_dict else out.to_tuple()


def standardize_depth(depth: torch.Tensor) -> torch.Tensor:
    """(batch, H, W) depth maps -> zero mean, unit (biased) variance per map: relative depth."""
    flat = depth.flatten(1)
    mean, std = flat.mean(1, keepdim=True), flat.std(1, unbiased=False, keepdim=True)
    return ((flat - mean) / (std + 1e-6)).view_as(depth)


__all__ = ["CroCoModel", "CroCoForPretraining", "CroCoForDepthEstimation", "CroCoPreTrainedModel",
           "CroCoModelOutput", "CroCoForPretrainingOutput", "RotaryEmbedding2D", "grid_positions",
           "normalized_patch_mse", "patch_errors",
           "patchify", "random_mask", "sincos_position_embedding", "standardize_depth", "unpatchify"]
