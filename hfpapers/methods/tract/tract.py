"""TrAct on the first layer of any vision model: the closed-form weight gradient of Petersen et al. (2024), §3.

The first layer's pre-activations z = W x are the variables TrAct trains: the step it proposes on them,
z* = z - eta * b * dL/dz (Eq. 3), is turned into the weight update closest to it under a ridge penalty
(Eq. 5-7), whose closed form (Lemma 1, Eq. 9-10) replaces the plain weight gradient dL/dW = G^T X:

    dW = G^T X (X^T X / b + l I_n)^-1 = G^T (X X^T / b + l I_b)^-1 X        (X: b x n, one row per input vector)

The first form costs an n x n solve, the second (Woodbury) a b x b one: the smaller is used. Only the weight
gradient changes (input and bias gradients stay as they are), so every optimiser uses it unchanged. A convolution's
rows are its input patches (b = batch x output positions), taken exactly as the convolution sees them: with its
stride, dilation, padding (`same` and non-zero `padding_mode` included) and, per group, its own input channels.

`apply_tract(model, l)` changes the first layer's `forward` in place, so the weights, their names and
`save_pretrained` stay as they are; `remove_tract(model)` restores it.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from ...engine import Callback

__all__ = ["apply_tract", "remove_tract", "find_first_layer", "tract_weight_gradient",
           "tract_weight_gradient_from_outputs", "TrActCallback", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_lambda(l) -> float:
    if isinstance(l, bool) or not isinstance(l, (int, float)) or not math.isfinite(l) or l <= 0:
        raise ValueError(f"TrAct's l (lambda, the ridge weight of Eq. 5) must be a finite number above 0, got {l!r}")
    return float(l)


def tract_weight_gradient(grad_weight: torch.Tensor, inputs: torch.Tensor, l: float) -> torch.Tensor:
    """TrAct's weight gradient (Eq. 10) from the plain one.

    grad_weight: (groups, m, n), the plain gradient G^T X of each group's weight rows;
    inputs: (groups, b, n), each group's b input rows X. Returns (groups, m, n).
    For b >= n: G^T X (X^T X / b + l I_n)^-1. For b < n (Woodbury, the same matrix):
    (G^T X - G^T X X^T (X X^T + b l I_b)^-1 X) / l, which needs only G^T X and X.
    """
    b, n = inputs.shape[-2:]
    if b >= n:
        gram = inputs.transpose(-1, -2) @ inputs / b
        gram.diagonal(dim1=-2, dim2=-1).add_(l)
        # The system is symmetric positive definite: grad (X^T X/b + l I)^-1 = ((X^T X/b + l I)^-1 grad^T)^T.
        return torch.cholesky_solve(grad_weight.transpose(-1, -2), torch.linalg.cholesky(gram)).transpose(-1, -2)
    projected = grad_weight @ inputs.transpose(-1, -2)  # G^T X X^T: (groups, m, b)
    correction = torch.cholesky_solve(projected.transpose(-1, -2), _woodbury_factor(inputs, l)).transpose(-1, -2)
    return (grad_weight - correction @ inputs) / l


def _woodbury_factor(inputs: torch.Tensor, l: float) -> torch.Tensor:
    """The Cholesky factor of X X^T + b l I_b, the b x b system of the Woodbury form."""
    gram = inputs @ inputs.transpose(-1, -2)
    gram.diagonal(dim1=-2, dim2=-1).add_(inputs.shape[-2] * l)
    return torch.linalg.cholesky(gram)


def tract_weight_gradient_from_outputs(grad_outputs: torch.Tensor, inputs: torch.Tensor, l: float) -> torch.Tensor:
    """Eq. 10 in the Woodbury form from the output gradient G (b, m) and inputs X (b, n), b < n:
    G^T (X X^T / b + l I_b)^-1 X = b ((X X^T + b l I_b)^-1 G)^T X. One b x m x n product, as the plain G^T X;
    starting from G^T X instead (`tract_weight_gradient`) costs two more."""
    solved = torch.cholesky_solve(grad_outputs, _woodbury_factor(inputs, l))
    return inputs.shape[-2] * solved.transpose(-1, -2) @ inputs


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first layer's input as (groups, b, n): one row per input vector the weight multiplies."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    # The input as the convolution sees it: padded on each side (asymmetric for an even kernel with `same`).
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    if x.dim() == len(layer.kernel_size) + 1:  # an unbatched input
        x = x.unsqueeze(0)
    dims = len(layer.kernel_size)
    for i, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # the windows of dimension i, appended as the last dimension
    if any(d > 1 for d in layer.dilation):
        x = x[(..., *(slice(None, None, d) for d in layer.dilation))]
    # (batch, channels, positions..., kernel...) -> (batch * positions, channels * kernel), the weight's layout.
    x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    rows = x.reshape(-1, layer.groups, x.shape[1 + dims] // layer.groups * math.prod(layer.kernel_size))
    return rows.transpose(0, 1)


class _TrActWeight(torch.autograd.Function):
    """The identity on the weight, whose backward replaces the plain weight gradient by TrAct's."""

    @staticmethod
    def forward(ctx, weight, x, layer, l):
        ctx.save_for_backward(x)
        ctx.layer, ctx.l = layer, l
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        (x,) = ctx.saved_tensors
        # Half-precision inputs would make the Gram matrix singular: solve in float32 at least.
        dtype = torch.promote_types(grad_weight.dtype, torch.float32)
        rows = _rows(ctx.layer, x.detach().to(dtype))
        grad = grad_weight.to(dtype).reshape(rows.shape[0], -1, rows.shape[-1])
        return tract_weight_gradient(grad, rows, ctx.l).reshape(grad_weight.shape).to(grad_weight.dtype), None, None, \
            None


class _TrActLinear(torch.autograd.Function):
    """A Linear layer with fewer input rows than features (b < n, the Woodbury form), whose backward computes TrAct's
    weight gradient from the output gradient directly (`tract_weight_gradient_from_outputs`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, l):
        ctx.save_for_backward(x, weight)
        ctx.l = l
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = (grad_output @ weight.to(grad_output.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = rows.sum(0) if ctx.needs_input_grad[2] else None
        dtype = torch.promote_types(grad_output.dtype, torch.float32)  # solve in float32 at least, as _TrActWeight
        grad_weight = tract_weight_gradient_from_outputs(rows.to(dtype), x.detach().reshape(-1, x.shape[-1]).to(dtype),
                                                         ctx.l)
        return grad_x, grad_weight.to(weight.dtype), grad_bias, None


def _linear_forward(self, input):
    if not (torch.is_grad_enabled() and self.weight.requires_grad):
        return F.linear(input, self.weight, self.bias)
    if input.numel() // input.shape[-1] < input.shape[-1]:  # b < n: from the output gradient, no G^T X first
        return _TrActLinear.apply(input, self.weight, self.bias, self.tract_l)
    return F.linear(input, _TrActWeight.apply(self.weight, input, self, self.tract_l), self.bias)


def _conv_forward(self, input):
    if not (torch.is_grad_enabled() and self.weight.requires_grad):
        return self._conv_forward(input, self.weight, self.bias)
    return self._conv_forward(input, _TrActWeight.apply(self.weight, input, self, self.tract_l), self.bias)


def find_first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's first layer: the first module, in definition order, that holds weights and no submodules
    (transformers defines embeddings, and a patch embedding's projection, before the layers that follow)."""
    for name, module in model.named_modules():
        if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
            return name, module
    raise ValueError(f"{type(model).__name__} has no layer with weights for TrAct to train")


def apply_tract(model: nn.Module, l: float = 0.1, layer: str | None = None) -> str:
    """Train the first layer of `model` with TrAct (ridge weight `l`, the paper's lambda; 0.1 recommended).

    `layer` names the layer (e.g. "vision_model.embeddings.patch_embedding") where the first one found
    (`find_first_layer`) is not the input layer. It must be a Linear or a Conv1d/2d/3d (a patch embedding's
    projection is a Conv2d). Applying again changes `l`. Returns the layer's name.
    """
    l = _check_lambda(l)
    name, module = (layer, model.get_submodule(layer)) if layer is not None else find_first_layer(model)
    if not isinstance(module, SUPPORTED_LAYERS):
        raise ValueError(f"TrAct trains a first layer that is a convolution, patch embedding or linear layer "
                         f"(nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d); the first layer of "
                         f"{type(model).__name__} is {name!r} ({type(module).__name__}): pass layer=<name> to "
                         f"choose another")
    module.tract_l = l
    module.forward = types.MethodType(_linear_forward if isinstance(module, nn.Linear) else _conv_forward, module)
    return name


def remove_tract(model: nn.Module) -> list[str]:
    """Undo `apply_tract`: the layers it changed get their own forward back. Returns their names."""
    names = []
    for name, module in model.named_modules():
        if "tract_l" in module.__dict__:
            del module.forward, module.tract_l
            names.append(name)
    return names


class TrActCallback(Callback):
    """Engine callback (`TrainingArguments(tract=0.1)`, `hfpapers train ... --tract`): TrAct on the model's first
    layer for the whole run; the trained model is saved plain."""

    def __init__(self, l: float = 0.1, layer: str | None = None):
        self.l = _check_lambda(l)
        self.layer = layer

    def on_train_begin(self, state, model, accelerator) -> None:
        name = apply_tract(accelerator.unwrap_model(model), self.l, self.layer)
        accelerator.print(f"TrAct (l={self.l}) on the first layer {name!r}")

    def on_train_end(self, state, model, accelerator) -> None:
        remove_tract(accelerator.unwrap_model(model))
