"""EfficientViM: Efficient Vision Mamba with Hidden State Mixer based State Space Duality (arXiv 2411.15241).

A hierarchical network whose global token mixer is the HSM-SSD: the image tokens are compressed into N hidden-state
tokens with an input-dependent, softmax-normalised state-space matrix, channel mixing and gating run on those N
tokens (not on the H*W image tokens), and the result is projected back. Module and parameter names follow the
official code, so official and timm checkpoints map onto ours key for key (see convert_efficientvim.py). Unlike
the official code (square inputs only), any height and width work, square or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput

from .configuration_efficientvim import EfficientViMConfig

# Each stride-2 3x3 convolution (padding 1) maps a side n to ceil(n / 2): the stem's four give the first stage
# ceil(H / 16) x ceil(W / 16) tokens, each PatchMerging halves that again (rounding up), so every H, W >= 1 runs.


class LayerNorm1D(nn.Module):
    """LayerNorm over channels of a (batch, channels, tokens) tensor; parameters shaped (1, channels, 1)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))
        self.channels_last = False  # set by fuse(): x has channels innermost in memory, one layer_norm kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            normed = F.layer_norm(x.movedim(1, -1), x.shape[1:2], self.weight.flatten(), self.bias.flatten(), self.eps)
            return normed.movedim(-1, 1)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # biased, as the official layer
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class LayerNorm2D(LayerNorm1D):
    """LayerNorm over channels of a (batch, channels, height, width) tensor; parameters shaped (1, channels, 1, 1)."""

    def __init__(self, channels: int, eps: float):
        super().__init__(channels, eps)
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))


class ConvLayer2D(nn.Module):
    """conv (no bias when normalised) -> optional BatchNorm -> optional ReLU; keys `conv.*`, `norm.*`."""

    def __init__(self, in_dim, out_dim, kernel_size=3, stride=1, groups=1, norm=True, act=True, eps=1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_dim, eps=eps) if norm else None
        self.act = nn.ReLU() if act else None
        self.prepack = False  # fuse(), on CPU in float32: run on a kernel prepacked by oneDNN for the input's shape
        self._packed = None  # (input shape, kernel storage and version, packed kernel): made on use, never saved

    def forward(self, x):
        c = self.conv
        cpu_float32 = x.device.type == c.weight.device.type == "cpu" and x.dtype == c.weight.dtype == torch.float32
        if self.prepack and cpu_float32 and not torch.compiler.is_compiling():
            # one oneDNN call with the ReLU inside, on the kernel in the blocked layout oneDNN picked for this input
            # shape (no per-call weight reorder; the same result as the conv); torch.compile packs its own
            key = (x.shape, c.weight.data_ptr(), c.weight._version)
            if self._packed is None or self._packed[0] != key:
                self._packed = (key, torch.ops.mkldnn._reorder_convolution_weight(
                    c.weight, c.padding, c.stride, c.dilation, c.groups, list(x.shape)))
            return torch.ops.mkldnn._convolution_pointwise(x, self._packed[1], c.bias, c.padding, c.stride,
                                                           c.dilation, c.groups, "relu" if self.act else "none", [], "")
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x

    @torch.no_grad()
    def fuse(self, scale: torch.Tensor | float = 1.0, identity: torch.Tensor | float = 0.0) -> None:
        """Fold the BatchNorm (inference statistics) into the conv, then compute `scale * y + identity * x`
        with the conv alone (depthwise, same-size convs only for a non-zero `identity`): one conv at inference."""
        weight = self.conv.weight
        like = {"dtype": weight.dtype, "device": weight.device}  # the fused conv keeps the source weights' dtype/device
        bias = self.conv.bias if self.conv.bias is not None else torch.zeros(weight.shape[0], **like)
        if self.norm is not None:
            std = (self.norm.running_var + self.norm.eps).sqrt()
            weight = weight * (self.norm.weight / std).view(-1, 1, 1, 1)
            bias = self.norm.bias + (bias - self.norm.running_mean) * self.norm.weight / std
        scale = torch.as_tensor(scale, **like).reshape(-1)
        identity = torch.as_tensor(identity, **like).reshape(-1)
        weight, bias = weight * scale.view(-1, 1, 1, 1), bias * scale
        if identity.abs().sum() > 0:
            if self.conv.groups != self.conv.in_channels or self.conv.stride != (1, 1) or weight.shape[1] != 1:
                raise ValueError("an identity term folds only into a depthwise, stride-1 conv")
            k = weight.shape[-1] // 2
            weight = weight.clone()
            weight[:, 0, k, k] += identity
        fused = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size, self.conv.stride,
                          self.conv.padding, groups=self.conv.groups, bias=True, **like)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.conv, self.norm = fused, None
        if self.act is not None:  # at inference the conv's output is fresh: rectify it in place
            self.act = nn.ReLU(inplace=True)
        self.prepack = torch.backends.mkldnn.is_available()

    def __getstate__(self):  # copy / pickle: the packed kernel is opaque to both, and made again on first use
        return {**super().__getstate__(), "_packed": None}


class ConvLayer1D(nn.Module):
    """A bias-free 1x1 Conv1d on (batch, channels, tokens); key `conv.weight` of shape (out, in, 1)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, 1, bias=False)

    def forward(self, x):
        return self.conv(x)


class FFN(nn.Module):
    """1x1 conv + BN + ReLU (expansion mlp_ratio), then 1x1 conv + BN."""

    def __init__(self, dim, hidden, eps):
        super().__init__()
        self.fc1 = ConvLayer2D(dim, hidden, 1, eps=eps)
        self.fc2 = ConvLayer2D(hidden, dim, 1, act=False, eps=eps)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class HiddenStateMixerSSD(nn.Module):
    """HSM-SSD (paper §3.2, Eq. 8-10), single head.

    x (batch, C, L) -> B, C, dt = dw3x3(1x1(x)) each (batch, N, L); A = softmax_L(dt + A_log);
    h = x (A o B)^T (batch, C, N): the L image tokens compressed into N hidden-state tokens;
    h = out_proj(h * SiLU(z) + D * h) with (h, z) = hz_proj(h), all in hidden-state space;
    y = h C (batch, C, L). Returns y as a (batch, C, height, width) map and h.
    """

    def __init__(self, dim: int, state_dim: int, ssd_expand: float):
        super().__init__()
        self.state_dim = state_dim
        self.inner_dim = int(ssd_expand * dim)
        self.BCdt_proj = ConvLayer1D(dim, 3 * state_dim)
        self.dw = ConvLayer2D(3 * state_dim, 3 * state_dim, 3, groups=3 * state_dim, norm=False, act=False)
        # As the official HSMSSD: hz_proj reads the dim-channel hidden state, out_proj the inner_dim-channel gate.
        self.hz_proj = ConvLayer1D(dim, 2 * self.inner_dim)
        self.out_proj = ConvLayer1D(self.inner_dim, dim)
        self.A = nn.Parameter(torch.empty(state_dim))
        self.D = nn.Parameter(torch.empty(1))
        self.channels_last = False  # set by fuse(): x arrives token-major, y leaves token-major

    def forward(self, x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, tokens = x.shape
        if self.channels_last:
            # x is (batch, C, L) over (batch, L, C) memory: the 1x1 projection is one GEMM over all tokens, and
            # its (batch, L, 3N) result viewed as (batch, 3N, H, W) is the channels-last map the dw conv wants.
            BCdt = F.linear(x.transpose(1, 2), self.BCdt_proj.conv.weight.flatten(1))
            BCdt = self.dw(BCdt.transpose(1, 2).view(batch, -1, height, width)).flatten(2)
        else:
            BCdt = self.dw(self.BCdt_proj(x).view(batch, -1, height, width)).flatten(2)
        B, C, dt = BCdt.chunk(3, dim=1)
        A = (dt + self.A.view(1, -1, 1)).softmax(-1)  # normalised over the L image tokens
        h = x @ (A * B).transpose(-2, -1)  # (batch, C, N)
        h, z = self.hz_proj(h).chunk(2, dim=1)
        h = self.out_proj(h * F.silu(z) + h * self.D)
        # y = h C, (batch, C, L); channels-last: computed as (C^T h^T)^T so that it lands token-major.
        y = (C.transpose(1, 2) @ h.transpose(1, 2)).transpose(1, 2) if self.channels_last else h @ C
        return y.view(batch, -1, height, width), h


class EfficientViMBlock(GradientCheckpointingLayer):
    """Four gated branches, each a convex mix `x <- (1 - a) x + a branch(x)` with `a = sigmoid(alpha)`:
    depthwise conv, HSM-SSD on the layer-normalised tokens, depthwise conv, FFN. Returns (x, h)."""

    def __init__(self, dim: int, state_dim: int, config: EfficientViMConfig):
        super().__init__()
        eps = config.batch_norm_eps
        self.dwconv1 = ConvLayer2D(dim, dim, 3, groups=dim, act=False, eps=eps)
        self.norm = LayerNorm1D(dim, config.layer_norm_eps)
        self.mixer = HiddenStateMixerSSD(dim, state_dim, config.ssd_expand)
        self.dwconv2 = ConvLayer2D(dim, dim, 3, groups=dim, act=False, eps=eps)
        self.ffn = FFN(dim, int(dim * config.mlp_ratio), eps)
        self.alpha = nn.Parameter(torch.empty(4, dim))
        self.fused = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2:]
        if self.fused:  # (1 - a) x + a f(x) as one lerp kernel, x + a (f(x) - x), with a fixed at fuse()
            x = self.dwconv1(x)
            y, h = self.mixer(self.norm(x.flatten(2)), height, width)
            x = self.dwconv2(torch.lerp(x, y, self.fused_gates[0]))
            return torch.lerp(x, self.ffn(x), self.fused_gates[1]), h
        gate = self.alpha.sigmoid().view(4, 1, -1, 1, 1)
        x = (1 - gate[0]) * x + gate[0] * self.dwconv1(x)
        y, h = self.mixer(self.norm(x.flatten(2)), height, width)
        x = (1 - gate[1]) * x + gate[1] * y
        x = (1 - gate[2]) * x + gate[2] * self.dwconv2(x)
        x = (1 - gate[3]) * x + gate[3] * self.ffn(x)
        return x, h

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold BatchNorms and the two depthwise branches' gates `(1 - a) x + a dw(x)` into single convs."""
        gate = self.alpha.sigmoid()
        self.dwconv1.fuse(scale=gate[0], identity=1 - gate[0])
        self.dwconv2.fuse(scale=gate[2], identity=1 - gate[2])
        self.ffn.fc1.fuse()
        self.ffn.fc2.fuse()
        self.mixer.dw.fuse()  # nothing to fold: its kernel is prepacked
        self.mixer.channels_last = self.norm.channels_last = True
        # the gates of the HSM-SSD and FFN branches, (2, 1, C, 1, 1); not saved (a fused model is never saved)
        self.register_buffer("fused_gates", gate[[1, 3]].view(2, 1, -1, 1, 1).clone(), persistent=False)
        self.fused = True


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as timm's (reduced channels rounded to a multiple of 8; keys `fc1`, `fc2`)."""

    def __init__(self, channels: int, rd_ratio: float = 0.25):
        super().__init__()
        reduced = _make_divisible(channels * rd_ratio, 8)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


def _make_divisible(value: float, divisor: int) -> int:
    """Round to the nearest multiple of `divisor` (at least `divisor`), as timm's make_divisible(round_limit=0)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class PatchMerging(GradientCheckpointingLayer):
    """Downsampling between stages: dw-conv residual, 1x1 expand (x4), dw 3x3 stride 2, SE, 1x1 project,
    dw-conv residual."""

    def __init__(self, in_dim: int, out_dim: int, eps: float, ratio: float = 4.0):
        super().__init__()
        hidden = int(out_dim * ratio)
        self.dwconv1 = ConvLayer2D(in_dim, in_dim, 3, groups=in_dim, act=False, eps=eps)
        self.conv = nn.Sequential(
            ConvLayer2D(in_dim, hidden, 1, eps=eps),
            ConvLayer2D(hidden, hidden, 3, stride=2, groups=hidden, eps=eps),
            SqueezeExcite(hidden, 0.25),
            ConvLayer2D(hidden, out_dim, 1, act=False, eps=eps),
        )
        self.dwconv2 = ConvLayer2D(out_dim, out_dim, 3, groups=out_dim, act=False, eps=eps)
        self.fused = False

    def forward(self, x):
        if self.fused:
            return self.dwconv2(self.conv(self.dwconv1(x)))
        x = x + self.dwconv1(x)
        x = self.conv(x)
        return x + self.dwconv2(x)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold BatchNorms, and the residuals `x + dw(x)` into the depthwise kernels."""
        self.dwconv1.fuse(identity=1.0)
        self.dwconv2.fuse(identity=1.0)
        for layer in self.conv:
            if isinstance(layer, ConvLayer2D):
                layer.fuse()
        self.fused = True


class Stem(nn.Module):
    """Four stride-2 3x3 convs (3 -> D/8 -> D/4 -> D/2 -> D), ReLU after all but the last: stride 16."""

    def __init__(self, in_channels: int, dim: int, eps: float):
        super().__init__()
        widths = [in_channels, dim // 8, dim // 4, dim // 2, dim]
        self.conv = nn.Sequential(*(
            ConvLayer2D(widths[i], widths[i + 1], 3, stride=2, act=i < 3, eps=eps) for i in range(4)
        ))

    def forward(self, x):
        return self.conv(x)


class EfficientViMStage(nn.Module):
    def __init__(self, dim: int, out_dim: int | None, depth: int, state_dim: int, config: EfficientViMConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EfficientViMBlock(dim, state_dim, config) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, config.batch_norm_eps) if out_dim is not None else None

    def forward(self, x):
        for block in self.blocks:
            x, h = block(x)
        # The stage's hidden state is its last block's; the fusion head reads it before downsampling.
        features = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, features, h


@dataclass
class EfficientViMModelOutput(ModelOutput):
    """
    last_hidden_state: (batch, C3, H/64, W/64) final feature map.
    pooler_output: (batch, C3) globally average-pooled final map.
    hidden_states: per-stage feature maps before downsampling, (batch, C_i, H/2^(4+i), W/2^(4+i)), with
        output_hidden_states.
    stage_hidden_states: per-stage HSM-SSD hidden states h of the last block, (batch, C_i, N_i), with
        output_hidden_states.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    stage_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class EfficientViMImageClassifierOutput(ModelOutput):
    """logits: fused (softmax-weighted) logits; with distillation, in eval the mean of the class and distillation
    heads, in training the class head's (`distillation_logits` holds the other)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    distillation_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    stage_hidden_states: tuple[torch.Tensor, ...] | None = None


class EfficientViMPreTrainedModel(PreTrainedModel):
    config_class = EfficientViMConfig
    base_model_prefix = "efficientvim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["EfficientViMBlock", "PatchMerging"]
    supports_gradient_checkpointing = True

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers=1):
        func = {} if gradient_checkpointing_func is None else {"gradient_checkpointing_func": gradient_checkpointing_func}
        super()._set_gradient_checkpointing(enable, every_n_layers=every_n_layers, **func)
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._gradient_checkpointing_func = partial(
                    _checkpoint_keeping_batch_norm_statistics, module._gradient_checkpointing_func, module)

    @torch.no_grad()
    def _init_weights(self, module):
        # As the official model: heads trunc-normal, every norm at (1, 0) (including the BatchNorms that the
        # official blocks ask to start at 0: its model-level init overrides that), convs at PyTorch's default.
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, HiddenStateMixerSSD):
            init.uniform_(module.A, 1.0, 16.0)
            init.ones_(module.D)
        elif isinstance(module, EfficientViMBlock):
            init.constant_(module.alpha, self.config.alpha_init)
        elif isinstance(module, LayerNorm1D):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EfficientViMForImageClassification):
            init.ones_(module.weights)
            if module.weights_dist is not None:
                init.ones_(module.weights_dist)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)

    @torch.no_grad()
    def fuse(self):
        """Reparameterise for inference: BatchNorms folded into their convs, depthwise branches and residuals
        folded into their kernels, the gated branch sums done as single lerps, and the convs run channels-last
        (the input is converted on entry; feature maps come out in channels-last memory, same shapes). Outputs
        stay equal (to float rounding); the model can no longer be trained or saved, so fuse a copy used for
        inference."""
        if self.training:
            raise ValueError("fuse() folds BatchNorm inference statistics: call model.eval() first")
        for module in list(self.modules()):
            if isinstance(module, (EfficientViMBlock, PatchMerging)) and not module.fused:
                module.fuse()
            elif isinstance(module, Stem):
                for layer in module.conv:
                    if layer.norm is not None:
                        layer.fuse()
        for module in self.modules():  # oneDNN's convs run faster on NHWC than on NCHW here
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
        self.config.fused = True
        return self

    def save_pretrained(self, *args, **kwargs):
        if getattr(self.config, "fused", False):
            raise ValueError("this model was fused for inference (fuse()); save the unfused model instead")
        return super().save_pretrained(*args, **kwargs)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The normalised image batch, in the model's dtype (float pixels are cast, as transformers' ViT does)."""
        c = self.config
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4 or pixel_values.shape[1] != c.num_channels:
            got = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must have shape (batch, {c.num_channels}, height, width), got {got}")
        if pixel_values.shape[0] == 0 or min(pixel_values.shape[2:]) == 0:
            raise ValueError(f"pixel_values must hold at least one image of at least 1x1 pixels, got shape "
                             f"{tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, normalised by the image processor; got "
                             f"{pixel_values.dtype} (raw {pixel_values.dtype} pixels are not normalised)")
        # A NaN makes both extremes NaN, an inf is one of them: one pass, no (batch, C, H, W) mask or float64 copy
        # per call (skipped while torch.compile traces: a data-dependent branch would break the graph).
        if not torch.compiler.is_compiling() and not torch.isfinite(torch.stack(torch.aminmax(pixel_values))).all():
            raise ValueError("pixel_values contain NaN or infinite values; expected finite, normalised pixels")
        return pixel_values.to(self.dtype)


def _checkpoint_keeping_batch_norm_statistics(checkpoint, layer: nn.Module, function, *args):
    """Gradient checkpointing of `layer` whose backward recomputation leaves the BatchNorm running statistics as
    the forward pass left them: without this, each training step would update them twice."""
    calls = 0

    def run(*inputs):
        nonlocal calls
        calls += 1
        if calls == 1:
            return function(*inputs)
        buffers = [b for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
        saved = [b.clone() for b in buffers]
        try:
            return function(*inputs)
        finally:  # also when non-reentrant checkpointing stops the recomputation early
            for buffer, value in zip(buffers, saved):
                # through .data: batch_norm saved these buffers for backward, whose version check must still pass
                buffer.data.copy_(value)

    return checkpoint(run, *args)


class EfficientViMModel(EfficientViMPreTrainedModel):
    def __init__(self, config: EfficientViMConfig):
        super().__init__(config)
        dims = list(config.embed_dim)
        self.patch_embed = Stem(config.num_channels, dims[0], config.batch_norm_eps)
        self.stages = nn.ModuleList(
            EfficientViMStage(dims[i], dims[i + 1] if i < 2 else None, config.depths[i], config.state_dim[i], config)
            for i in range(3)
        )
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> EfficientViMModelOutput | tuple:
        """pixel_values: (batch, num_channels, height, width), any height and width: the stages run on
        ceil(H / 16) x ceil(W / 16), then ceil(H / 32) x ceil(W / 32), then ceil(H / 64) x ceil(W / 64) tokens."""
        pixel_values = self._check_pixel_values(pixel_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if getattr(self.config, "fused", False):  # the fused convs are channels-last (fuse())
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(pixel_values)
        features, states = [], []
        for stage in self.stages:
            x, stage_features, h = stage(x)
            features.append(stage_features)
            states.append(h)
        output = EfficientViMModelOutput(
            last_hidden_state=x,
            pooler_output=x.mean((2, 3)),
            hidden_states=tuple(features) if output_hidden_states else None,
            stage_hidden_states=tuple(states),  # the fusion head always needs them
        )
        return output if return_dict else output.to_tuple()


class EfficientViMForImageClassification(EfficientViMPreTrainedModel):
    """EfficientViM with the multi-stage hidden-state fusion (MSF) head: one classifier on each stage's
    normalised, token-averaged hidden state and one on the pooled final map, mixed by softmax(weights)."""

    def __init__(self, config: EfficientViMConfig):
        super().__init__(config)
        dims = list(config.embed_dim)
        self.efficientvim = EfficientViMModel(config)
        self.norm = nn.ModuleList([LayerNorm1D(d, config.layer_norm_eps) for d in dims]
                                  + [LayerNorm2D(dims[-1], config.layer_norm_eps)])
        self.heads = nn.ModuleList(nn.Linear(d, config.num_labels) for d in dims + [dims[-1]])
        self.weights = nn.Parameter(torch.empty(4))
        if config.distillation:
            self.heads_dist = nn.ModuleList(nn.Linear(d, config.num_labels) for d in dims + [dims[-1]])
            self.weights_dist = nn.Parameter(torch.empty(4))
        else:
            self.heads_dist, self.weights_dist = None, None
        self.post_init()

    def _fused_logits(self, features, heads, weights):
        return sum(w * head(f) for w, head, f in zip(weights.softmax(-1), heads, features))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> EfficientViMImageClassifierOutput | tuple:
        """labels as transformers' image classifiers take them, following `config.problem_type` (inferred on the
        first call when unset): (batch,) class indices -> cross-entropy; (batch, num_labels) floats -> multi-label
        BCE; num_labels == 1 -> regression (MSE). Training recipes with soft targets compute their own loss."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        outputs = self.efficientvim(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        features = [norm(h).mean(-1) for norm, h in zip(self.norm, outputs.stage_hidden_states)]
        features.append(self.norm[3](outputs.last_hidden_state).mean((2, 3)))
        logits = self._fused_logits(features, self.heads, self.weights)
        distillation_logits = None
        if self.heads_dist is not None:
            distillation_logits = self._fused_logits(features, self.heads_dist, self.weights_dist)
            if not self.training:  # DeiT: at inference the two heads are averaged
                logits = (logits + distillation_logits) / 2
        loss = None
        if labels is not None:
            loss = self.loss_function(labels.to(logits.device), logits, self.config)
        output = EfficientViMImageClassifierOutput(
            loss=loss, logits=logits, distillation_logits=distillation_logits,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            stage_hidden_states=outputs.stage_hidden_states if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["EfficientViMModel", "EfficientViMForImageClassification", "EfficientViMPreTrainedModel",
           "HiddenStateMixerSSD", "EfficientViMBlock", "PatchMerging"]
