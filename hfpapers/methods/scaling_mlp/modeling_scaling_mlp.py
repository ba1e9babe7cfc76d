"""The bottleneck MLP (B-MLP) of "Scaling MLPs: A Tale of Inductive Bias" (Bachmann et al., arXiv 2306.13575).

An image is flattened in (channels, height, width) order and processed by a stack of pre-norm inverted-bottleneck
blocks. Module and parameter names follow the official code (`linear_in`, `blocks.i.block.{0,2}`, `layernorms.i`,
`linear_out`), so official checkpoints map onto ours by prefixing the body with `mlp.`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .configuration_scaling_mlp import ScalingMLPConfig


class BottleneckBlock(GradientCheckpointingLayer):
    """Inverted bottleneck `fc2(act(fc1(x)))`: hidden_size -> expansion_factor * hidden_size -> hidden_size."""

    def __init__(self, config: ScalingMLPConfig):
        super().__init__()
        wide = config.expansion_factor * config.hidden_size
        # A Sequential so the keys are the official `block.0` (thin -> wide) and `block.2` (wide -> thin).
        self.block = nn.Sequential(
            nn.Linear(config.hidden_size, wide), ACT2FN[config.hidden_act], nn.Linear(wide, config.hidden_size)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block(hidden_states)


class PackedLinear(nn.Linear):
    """A Linear and the activation after it (`"gelu"`, exact, or `"none"`) as one oneDNN call on a prepacked weight:
    the CPU inference path of `fuse()`. It shares the Linear's parameters (same keys; training and saving are
    unchanged); the packed copy is made on first use and again whenever the weight changes (its version counter).
    Outside float32 CPU inference (autograd, autocast, torch.compile, another device) it is the plain Linear."""

    def __init__(self, linear: nn.Linear, activation: str):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias, self.activation = linear.weight, linear.bias, activation
        self._packed = None  # (weight storage, version, packed weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packable(x):
            weight = self.weight
            key = (weight.data_ptr(), weight._version)
            if self._packed is None or self._packed[:2] != key:
                self._packed = (*key, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
            return torch.ops.mkldnn._linear_pointwise(x, self._packed[2], self.bias, self.activation, [], "none")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.activation == "gelu" else y

    def _packable(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 and not needs_grad
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and torch.backends.mkldnn.is_available())

    def __getstate__(self):  # copy / pickle: the packed weight is opaque to both, and made again on first use
        return {**super().__getstate__(), "_packed": None}


def _make_norm(config: ScalingMLPConfig) -> nn.Module:
    if config.norm_type == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    if config.norm_type == "batch":
        return nn.BatchNorm1d(config.hidden_size, eps=config.layer_norm_eps)
    return nn.Identity()


class ScalingMLPPreTrainedModel(PreTrainedModel):
    config_class = ScalingMLPConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["BottleneckBlock"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and self.config.initializer_range is None:
            # PyTorch's own nn.Linear initialisation, which the official code trains from.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)

    def fuse(self):
        """CPU inference in float32 on oneDNN's prepacked weights, each block's GELU computed inside its first GEMM
        (`PackedLinear`): the same outputs to float rounding, the same parameters and keys (the model still trains
        and saves as before). Returns the model."""
        if self.config.hidden_act == "gelu":
            for block in [m for m in self.modules() if isinstance(m, BottleneckBlock)]:
                if type(block.block[0]) is nn.Linear:
                    block.block[0], block.block[1] = PackedLinear(block.block[0], "gelu"), nn.Identity()
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child, "none"))
        return self

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The normalised image batch, in the model's dtype (float pixels are cast, as transformers' ViT does)."""
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            got = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must have shape (batch, {c.num_channels}, {c.image_size}, {c.image_size}) for this "
                f"model, got {got}; resize images with the model's image processor"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, normalised by the image processor; got "
                             f"{pixel_values.dtype} (raw {pixel_values.dtype} pixels are not normalised)")
        if pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values is an empty batch, shape {tuple(pixel_values.shape)}; "
                             "pass at least one image")
        # A NaN makes both extremes NaN, an inf is one of them: one pass, no (batch, C, H, W) mask or float64 copy
        # per call (skipped while torch.compile traces: a data-dependent branch would break the graph).
        if not torch.compiler.is_compiling() and not torch.isfinite(torch.stack(torch.aminmax(pixel_values))).all():
            raise ValueError("pixel_values contain NaN or infinite values; expected finite, normalised pixels")
        return pixel_values.to(self.dtype)


class ScalingMLPModel(ScalingMLPPreTrainedModel):
    """`linear_in` and the residual blocks; returns the residual stream of shape (batch, hidden_size)."""

    def __init__(self, config: ScalingMLPConfig):
        super().__init__(config)
        self.linear_in = nn.Linear(config.input_dim, config.hidden_size)
        self.blocks = nn.ModuleList(BottleneckBlock(config) for _ in range(config.num_blocks))
        self.layernorms = nn.ModuleList(_make_norm(config) for _ in range(config.num_blocks))
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """pixel_values: (batch, num_channels, image_size, image_size), normalised by the image processor."""
        pixel_values = self._check_pixel_values(pixel_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = self.linear_in(pixel_values.flatten(1))
        all_hidden = (hidden,) if output_hidden_states else None
        for norm, block in zip(self.layernorms, self.blocks):
            hidden = hidden + block(norm(hidden))  # pre-norm residual; no norm after the last block
            if output_hidden_states:
                all_hidden += (hidden,)
        if not return_dict:
            return tuple(v for v in (hidden, hidden, all_hidden) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden, hidden_states=all_hidden)


class ScalingMLPForImageClassification(ScalingMLPPreTrainedModel):
    """B-MLP with the classifier `linear_out` (the official head, applied to the un-normalised stream)."""

    def __init__(self, config: ScalingMLPConfig):
        super().__init__(config)
        self.mlp = ScalingMLPModel(config)
        self.linear_out = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """labels as transformers' image classifiers take them, following `config.problem_type` (inferred on the
        first call when unset): (batch,) class indices -> cross-entropy; (batch, num_labels) floats -> multi-label
        BCE; num_labels == 1 -> regression (MSE). Training recipes with soft targets compute their own loss."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.mlp(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.linear_out(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels.to(logits.device), logits, self.config)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = ["ScalingMLPModel", "ScalingMLPForImageClassification", "ScalingMLPPreTrainedModel", "BottleneckBlock"]
