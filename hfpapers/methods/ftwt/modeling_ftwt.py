"""Fire Together Wire Together (FTWT, Elkerdawy et al., CVPR 2022, arXiv 2110.08232): dynamic filter pruning with
self-supervised mask prediction, on transformers' ResNet modules or a VGG.

Every convolution unit (conv -> BN -> activation; the second conv of a residual block without its activation,
whose mask acts before the residual sum) gets a `MaskPredictor` that reads the unit's *input*: global average
pooling, softmax over channels, a 1x1 convolution to one logit per output filter, binarised at sigmoid > 0.5
(official `MaskPredictorNN`, `ConvWithMask` in utils/layers.py). The predictors learn from `ground_truth_mask`, the
filters that hold `mass_threshold` of the unit's activation mass (`get_gt_mask_ratio`), through `mask_loss`
(`compute_mask_loss_per_input` in utils/utils.py). The mask is computed without gradient, as the official code:
the task loss trains the backbone, the mask loss the predictors (and, in "joint" mode, the backbone too).

Two executions that agree: the masked dense one (training; full convolutions times the masks) and, in eval mode
with `sparse=True`, `SparseExecutor`, which runs only the predicted filters over only the channels that can be
non-zero, one image at a time, and counts the multiply-accumulates it executes.

Module names follow transformers' ResNet (`embedder.*`, `encoder.*`), so a `ResNetModel`'s weights load into the
backbone unchanged (`FTWTForImageClassification.from_resnet`).

This file ships as remote code: it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.resnet.modeling_resnet import (ResNetConvLayer, ResNetEmbeddings, ResNetEncoder,
                                                        ResNetShortCut)

from .configuration_ftwt import FTWTConfig

# Official `get_gt_mask_ratio`: cumulative mass may exceed the threshold by this much, and with a threshold of 1
# a filter holding at most this share of the mass counts as dead.
MASS_DELTA = 1e-5


def filter_scores(activations: torch.Tensor) -> torch.Tensor:
    """(batch, channels, H, W) -> (batch, channels): the largest absolute activation of each filter's map (the
    official `get_fmap_criteria`)."""
    return activations.detach().abs().amax(dim=(2, 3))


def ground_truth_mask(activations: torch.Tensor, mass_threshold: float) -> torch.Tensor:
    """The self-supervised target (batch, channels) in {0, 1}: with filters sorted by score (descending), keep the
    prefix whose cumulative share of the total score stays within `mass_threshold` (+1e-5); with a threshold of 1,
    drop only filters holding at most 1e-5 of the mass. An image whose scores are all zero keeps every filter
    (official: the division by zero gives NaN, which compares false)."""
    scores = filter_scores(activations)
    total = scores.sum(1, keepdim=True)
    share = scores / total.clamp_min(torch.finfo(scores.dtype).tiny)
    if mass_threshold == 1:
        drop = share <= MASS_DELTA
    else:
        sorted_share, order = torch.sort(share, descending=True, dim=1)
        drop_sorted = torch.cumsum(sorted_share, dim=1) - mass_threshold > MASS_DELTA
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return (~drop | (total == 0)).to(activations.dtype)


def uniform_ground_truth_mask(activations: torch.Tensor, pruning_ratio: float) -> torch.Tensor:
    """The "uniform" target (official `get_gt_mask_pratio`): drop the int(ratio * channels) lowest-scoring filters
    of each image, and every filter whose score is at most 1e-5."""
    scores = filter_scores(activations)
    keep = scores > MASS_DELTA
    num_drop = int(pruning_ratio * scores.shape[1])
    if num_drop:
        keep.scatter_(1, torch.sort(scores, dim=1).indices[:, :num_drop], False)
    return keep.to(activations.dtype)


def mask_loss(mask_logits, targets) -> torch.Tensor:
    """Official `compute_mask_loss_per_input`: per unit, binary cross-entropy with logits averaged over the batch and
    summed over filters; then the mean over units. `mask_logits` and `targets`: sequences of (batch, channels)."""
    per_unit = [F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").mean(0).sum()
                for logits, target in zip(mask_logits, targets, strict=True)]
    return torch.stack(per_unit).mean()


class MaskConv2d(nn.Conv2d):
    """The predictor's 1x1 convolution (the official `1Conv2dMask`): a class of its own because it keeps PyTorch's
    default initialisation (the official models initialise their layers before the predictors are added)."""


class MaskPredictor(nn.Module):
    """Official `MaskPredictorNN` with `--embedding -1`: (batch, in_channels, H, W) -> logits (batch, out_channels)
    from the globally average-pooled input, soft-maxed over channels (`--softmax 1`), through a 1x1 convolution
    (the official `1Conv2dMask`)."""

    def __init__(self, in_channels: int, out_channels: int, softmax: bool = True):
        super().__init__()
        self.softmax = softmax
        self.conv = MaskConv2d(in_channels, out_channels, kernel_size=1)

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: (batch, in_channels), the spatial mean of the input."""
        if self.softmax:
            pooled = pooled.softmax(dim=1)
        return self.conv(pooled[:, :, None, None]).flatten(1)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.logits_from_pooled(hidden_state.mean(dim=(2, 3)))


def binarize(logits: torch.Tensor) -> torch.Tensor:
    """The official `BinarizerSTEStatic(0.5, sigmoid(logits))`, under no_grad: 1 where the sigmoid exceeds 0.5."""
    return (logits.detach().sigmoid() > 0.5).to(logits.dtype)


class VGGConvLayer(nn.Module):
    """3x3 conv (with bias, as the official `make_layers`) -> BatchNorm -> ReLU, with the attribute names of
    transformers' `ResNetConvLayer`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(hidden_state)))


class VGGStage(nn.Module):
    """The conv units of one VGG stage, then a 2x2 max pool."""

    def __init__(self, in_channels: int, widths: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(VGGConvLayer(i, o) for i, o in zip([in_channels, *widths[:-1]], widths))
        self.pooler = nn.MaxPool2d(kernel_size=2, stride=2)


class ZeroPadShortCut(nn.Module):
    """The parameter-free shortcut of the official CIFAR ResNet (`downsample_basic_block`): 2x2 average pooling,
    then zero channels up to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            hidden_state = F.avg_pool2d(hidden_state, self.stride)
        return F.pad(hidden_state, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))


@dataclass
class FTWTModelOutput(BaseModelOutputWithPooling):
    r"""
    mask_logits (`tuple[torch.FloatTensor]`): per masked unit, the predictor's logits (batch, filters).
    masks (`tuple[torch.FloatTensor]`): per masked unit, the binary mask applied (batch, filters).
    ground_truth_masks (`tuple[torch.FloatTensor]`, *optional*): per masked unit, the self-supervised target
        (batch, filters); None in sparse execution.
    macs (`torch.FloatTensor`): (batch,) multiply-accumulates of the backbone's convolutions and the classifier
        that run for each image when masked filters and zero input channels are skipped (predictors excluded).
    predictor_macs (`torch.FloatTensor`): (batch,) multiply-accumulates of the mask predictors' 1x1 convolutions.
    live_channels (`torch.FloatTensor`): (batch,) channels of the last feature map that can be non-zero.
    """

    mask_logits: tuple[torch.FloatTensor, ...] | None = None
    masks: tuple[torch.FloatTensor, ...] | None = None
    ground_truth_masks: tuple[torch.FloatTensor, ...] | None = None
    macs: torch.FloatTensor | None = None
    predictor_macs: torch.FloatTensor | None = None
    live_channels: torch.FloatTensor | None = None


@dataclass
class FTWTImageClassifierOutput(ImageClassifierOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): cross-entropy plus the mask loss (when targets were computed).
    mask_loss (`torch.FloatTensor`, *optional*): the official mask loss (`mask_loss`), without weight.
    mask_logits, masks, ground_truth_masks, macs, predictor_macs: as in `FTWTModelOutput` (macs include the
        classifier).
    """

    mask_loss: torch.FloatTensor | None = None
    mask_logits: tuple[torch.FloatTensor, ...] | None = None
    masks: tuple[torch.FloatTensor, ...] | None = None
    ground_truth_masks: tuple[torch.FloatTensor, ...] | None = None
    macs: torch.FloatTensor | None = None
    predictor_macs: torch.FloatTensor | None = None


def _conv_macs(conv: nn.Conv2d, out_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one output filter over one input channel."""
    return conv.kernel_size[0] * conv.kernel_size[1] * out_size[0] * out_size[1] // conv.groups


class FTWTPreTrainedModel(PreTrainedModel):
    config_class = FTWTConfig
    base_model_prefix = "ftwt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ResNetConvLayer", "ResNetShortCut", "VGGConvLayer"]
    # The mask predictors learn from their own loss only: the binary mask carries no gradient (official code).
    _trained_by_own_loss = ("mask_predictors",)

    @torch.no_grad()
    def _init_weights(self, module):
        # The official CIFAR models: normal(0, sqrt(2 / (k*k*out))) = Kaiming fan-out for convolutions, BN at 1/0,
        # linear weights normal(0, 0.01) with zero bias; the predictors keep PyTorch's default conv init.
        if isinstance(module, MaskConv2d):
            init.kaiming_uniform_(module.weight, a=5 ** 0.5)
            bound = 1 / module.in_channels ** 0.5
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=0.01)
            init.zeros_(module.bias)

    def _check_pixel_values(self, pixel_values) -> torch.Tensor:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            got = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must have shape (batch, {c.num_channels}, {c.image_size}, "
                             f"{c.image_size}) for this model, got {got}; resize images with the model's image "
                             "processor")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, normalised by the image processor; got "
                             f"{pixel_values.dtype}")
        if pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values is an empty batch, shape {tuple(pixel_values.shape)}; pass at least one "
                             "image")
        # NaN makes both extremes NaN, an inf is one of them: one pass, no mask (skipped while torch.compile traces:
        # a data-dependent branch would break the graph)
        if not torch.compiler.is_compiling() and not torch.isfinite(torch.stack(torch.aminmax(pixel_values))).all():
            raise ValueError("pixel_values contain NaN or infinite values; expected finite, normalised pixels")
        return pixel_values.to(self.dtype)


class FTWTModel(FTWTPreTrainedModel):
    """The masked CNN: pixel_values (batch, num_channels, image_size, image_size) -> the last feature map
    (batch, hidden_size, h, w), pooled to (batch, hidden_size), with every unit's masks and targets."""

    def __init__(self, config: FTWTConfig):
        super().__init__(config)
        if config.backbone == "resnet":
            resnet = config.resnet_config
            self.embedder = ResNetEmbeddings(resnet)
            if config.stem_type == "cifar":
                self.embedder.embedder = ResNetConvLayer(config.num_channels, resnet.embedding_size, kernel_size=3,
                                                         stride=1, activation=resnet.hidden_act)
                self.embedder.pooler = nn.Identity()
            self.encoder = ResNetEncoder(resnet)
            if config.shortcut_type == "zero-pad":
                for stage in self.encoder.stages:
                    for layer in stage.layers:
                        if isinstance(layer.shortcut, ResNetShortCut):
                            conv = layer.shortcut.convolution
                            layer.shortcut = ZeroPadShortCut(conv.in_channels, conv.out_channels, conv.stride[0])
        else:
            widths = [config.num_channels] + [stage[-1] for stage in config.vgg_stages]
            self.stages = nn.ModuleList(VGGStage(i, stage) for i, stage in zip(widths, config.vgg_stages))
        self.pooler = nn.AdaptiveAvgPool2d(1)
        self.mask_predictors = nn.ModuleList(
            MaskPredictor(unit.convolution.in_channels, unit.convolution.out_channels, config.predictor_softmax)
            for unit in self.masked_units())
        self.post_init()

    def masked_units(self) -> list[nn.Module]:
        """The conv units that carry a mask predictor, in execution order (the official `fuse_masking_*`)."""
        if self.config.backbone == "vgg":
            return [layer for stage in self.stages for layer in stage.layers]
        return [self.embedder.embedder] + [unit for stage in self.encoder.stages for block in stage.layers
                                           for unit in block.layer]

    def dense_macs(self) -> int:
        """Multiply-accumulates per image of the unpruned backbone's convolutions (as thop counts them: BN,
        activations and pooling are free)."""
        shapes = {}
        hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, o.shape[-2:]))
                 for m in self.modules() if isinstance(m, nn.Conv2d)]
        c = self.config
        was_masking, was_training, c.masking = c.masking, self.training, False
        self.eval()  # a forward in training mode would move the BN statistics
        try:
            with torch.no_grad():  # dense, without predictors (they do not run without masks and targets)
                self._masked_forward(torch.zeros(1, c.num_channels, c.image_size, c.image_size, device=self.device,
                                                 dtype=self.dtype), False, mask_targets=False)
        finally:
            c.masking = was_masking
            self.train(was_training)
            for hook in hooks:
                hook.remove()
        return sum(m.out_channels * m.in_channels * _conv_macs(m, size) for m, size in shapes.items())

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, sparse: bool | None = None, mask_targets: bool | None = None,
                **kwargs) -> FTWTModelOutput | tuple:
        """pixel_values: (batch, num_channels, image_size, image_size), normalised by the image processor.
        sparse: run only the predicted filters, one image at a time (eval mode only; default
        `config.sparse_inference`).
        mask_targets: compute the self-supervised targets (default: in training mode). With masking off and no
        targets, the predictors do not run either: the plain dense network."""
        pixel_values = self._check_pixel_values(pixel_values)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        sparse = self.config.sparse_inference if sparse is None else sparse
        if sparse:
            if self.training:
                raise ValueError("sparse execution skips filters and has no gradient: call model.eval() first, or "
                                 "pass sparse=False")
            if not self.config.masking:
                raise ValueError("sparse execution needs config.masking=True (with masking off every filter runs)")
            outputs = SparseExecutor(self).run(pixel_values, output_hidden_states)
        else:
            outputs = self._masked_forward(pixel_values, output_hidden_states,
                                           self.training if mask_targets is None else mask_targets)
        return outputs if return_dict else outputs.to_tuple()

    def _masked_forward(self, pixel_values: torch.Tensor, output_hidden_states: bool,
                        mask_targets: bool = True) -> FTWTModelOutput:
        config = self.config
        predict = config.masking or mask_targets
        batch = pixel_values.shape[0]
        logits_per_unit, masks, targets = [], [], []
        predictors = iter(self.mask_predictors)
        # per image, which channels can be non-zero (a skipped filter's output is exactly zero)
        macs = pixel_values.new_zeros(batch)
        predictor_macs = pixel_values.new_zeros(batch)
        hidden_states = []

        def unit_forward(unit, hidden, live, activation=True):
            nonlocal macs, predictor_macs
            predictor = next(predictors)
            conv = unit.convolution
            out = unit.normalization(conv(hidden))
            if activation:
                out = unit.activation(out)
            if not predict:
                macs = macs + conv.out_channels * live.sum(1) * _conv_macs(conv, out.shape[-2:])
                return out, torch.ones(batch, conv.out_channels, dtype=torch.bool, device=out.device)
            logits = predictor(hidden.detach() if config.mask_mode == "decoupled" else hidden)
            if mask_targets and config.gt_type == "mass":
                targets.append(ground_truth_mask(out, config.mass_threshold))
            elif mask_targets:
                targets.append(uniform_ground_truth_mask(out, config.pruning_ratio))
            mask = binarize(logits) if config.masking else torch.ones_like(logits)
            out = out * mask[:, :, None, None]
            logits_per_unit.append(logits)
            masks.append(mask)
            macs = macs + mask.sum(1) * live.sum(1) * _conv_macs(conv, out.shape[-2:])
            predictor_macs = predictor_macs + conv.in_channels * conv.out_channels
            return out, mask > 0

        hidden = pixel_values
        live = torch.ones(batch, config.num_channels, dtype=torch.bool, device=hidden.device)
        if config.backbone == "vgg":
            for stage in self.stages:
                for unit in stage.layers:
                    hidden, live = unit_forward(unit, hidden, live)
                hidden = stage.pooler(hidden)
                if output_hidden_states:
                    hidden_states.append(hidden)
        else:
            hidden, live = unit_forward(self.embedder.embedder, hidden, live)
            hidden = self.embedder.pooler(hidden)
            if output_hidden_states:
                hidden_states.append(hidden)
            for stage in self.encoder.stages:
                for block in stage.layers:
                    residual, residual_live = block.shortcut(hidden), live
                    if isinstance(block.shortcut, ResNetShortCut):
                        conv = block.shortcut.convolution
                        macs = macs + conv.out_channels * live.sum(1) * _conv_macs(conv, residual.shape[-2:])
                        residual_live = torch.ones(batch, conv.out_channels, dtype=torch.bool, device=live.device)
                    elif isinstance(block.shortcut, ZeroPadShortCut):
                        residual_live = F.pad(live, (0, block.shortcut.out_channels - live.shape[1]))
                    units = list(block.layer)
                    for unit in units[:-1]:
                        hidden, live = unit_forward(unit, hidden, live)
                    hidden, live = unit_forward(units[-1], hidden, live, activation=False)
                    hidden = block.activation(hidden + residual)
                    live = live | residual_live
                if output_hidden_states:
                    hidden_states.append(hidden)
        return FTWTModelOutput(
            last_hidden_state=hidden, pooler_output=self.pooler(hidden).flatten(1),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            mask_logits=tuple(logits_per_unit) if predict else None, masks=tuple(masks) if predict else None,
            ground_truth_masks=tuple(targets) if mask_targets else None,
            macs=macs, predictor_macs=predictor_macs, live_channels=live.sum(1).to(macs.dtype))


class SparseExecutor:
    """Runs an eval-mode `FTWTModel` one image at a time on compact feature maps: each unit gathers the weights of
    its predicted filters over the channels that can be non-zero (`conv.weight[keep][:, live]`), with BatchNorm
    folded per filter, so skipped filters cost nothing; counts the multiply-accumulates it executes."""

    def __init__(self, model: FTWTModel):
        self.model = model
        self.config = model.config

    def _unit(self, unit, predictor, hidden, live, activation=True):
        """hidden: (1, len(live), H, W) holding the channels `live` of the unit's input. Returns the compact output,
        the kept filters, the mask logits and the executed MACs."""
        conv, norm = unit.convolution, unit.normalization
        pooled = hidden.new_zeros(1, conv.in_channels).index_copy(1, live, hidden.mean(dim=(2, 3)))
        logits = predictor.logits_from_pooled(pooled)
        keep = torch.nonzero(logits[0].sigmoid() > 0.5).flatten()
        height, width = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in
                         zip(hidden.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
        if len(keep) == 0:
            return hidden.new_zeros(1, 0, height, width), keep, logits, 0
        scale = norm.weight[keep] / torch.sqrt(norm.running_var[keep] + norm.eps)
        shift = norm.bias[keep] - norm.running_mean[keep] * scale
        bias = hidden.new_zeros(len(keep)) if conv.bias is None else conv.bias[keep]
        if len(live):
            weight = conv.weight if len(keep) == conv.out_channels else conv.weight[keep]
            weight = weight if len(live) == conv.in_channels else weight[:, live]  # copies only what is skipped
            out = F.conv2d(hidden, weight, bias, conv.stride, conv.padding, conv.dilation)
        else:  # an all-zero input: only the bias (torch's conv2d over no input channels returns no channels)
            out = bias[None, :, None, None].expand(1, len(keep), height, width)
        out = out * scale[:, None, None] + shift[:, None, None]
        if activation:
            out = unit.activation(out)
        return out, keep, logits, len(keep) * len(live) * _conv_macs(conv, (height, width))

    def run(self, pixel_values: torch.Tensor, output_hidden_states: bool) -> FTWTModelOutput:
        per_image = [self._image(image[None], output_hidden_states) for image in pixel_values]
        logits, masks, macs, live = zip(*[(item["logits"], item["masks"], item["macs"], item["live_channels"])
                                          for item in per_image])
        predictor_macs = sum(p.conv.in_channels * p.conv.out_channels for p in self.model.mask_predictors)
        last = torch.cat([item["hidden_states"][-1] for item in per_image])
        return FTWTModelOutput(
            last_hidden_state=last, pooler_output=self.model.pooler(last).flatten(1),
            hidden_states=tuple(torch.cat(h) for h in zip(*[item["hidden_states"] for item in per_image]))
            if output_hidden_states else None,
            mask_logits=tuple(torch.cat(unit) for unit in zip(*logits)),
            masks=tuple(torch.cat(unit) for unit in zip(*masks)), ground_truth_masks=None,
            macs=pixel_values.new_tensor(macs), live_channels=pixel_values.new_tensor(live),
            predictor_macs=pixel_values.new_full((len(per_image),), predictor_macs))

    def _image(self, image: torch.Tensor, output_hidden_states: bool) -> dict:
        model = self.model
        predictors = iter(model.mask_predictors)
        logits_per_unit, masks, widths, hidden_states = [], [], [], []
        macs = 0

        def unit_forward(unit, hidden, live, activation=True):
            nonlocal macs
            out, keep, logits, unit_macs = self._unit(unit, next(predictors), hidden, live, activation)
            logits_per_unit.append(logits)
            masks.append(torch.zeros_like(logits).index_fill_(1, keep, 1.0))
            macs += unit_macs
            return out, keep

        def full(hidden, live, channels):
            """The compact map scattered back to all channels (for outputs)."""
            return hidden.new_zeros(1, channels, *hidden.shape[-2:]).index_copy(1, live, hidden)

        hidden = image
        live = torch.arange(image.shape[1], device=image.device)
        if self.config.backbone == "vgg":
            for stage in model.stages:
                for unit in stage.layers:
                    hidden, live = unit_forward(unit, hidden, live)
                    channels = unit.convolution.out_channels
                hidden = stage.pooler(hidden)
                hidden_states.append(full(hidden, live, channels))
        else:
            hidden, live = unit_forward(model.embedder.embedder, hidden, live)
            hidden = model.embedder.pooler(hidden)
            hidden_states.append(full(hidden, live, model.embedder.embedder.convolution.out_channels))
            for stage in model.encoder.stages:
                for block in stage.layers:
                    units = list(block.layer)
                    channels = units[-1].convolution.out_channels
                    residual, residual_live = self._shortcut(block.shortcut, hidden, live)
                    out, out_live = hidden, live
                    for unit in units[:-1]:
                        out, out_live = unit_forward(unit, out, out_live)
                    out, out_live = unit_forward(units[-1], out, out_live, activation=False)
                    if isinstance(block.shortcut, ResNetShortCut):
                        conv = block.shortcut.convolution
                        macs += conv.out_channels * len(live) * _conv_macs(conv, residual.shape[-2:])
                    # the block's sum over the union of the two branches' channels
                    summed = hidden.new_zeros(1, channels, *out.shape[-2:])
                    summed.index_add_(1, residual_live, residual).index_add_(1, out_live, out)
                    live = torch.unique(torch.cat([residual_live, out_live]))  # sorted
                    hidden = block.activation(summed[:, live])
                hidden_states.append(full(hidden, live, channels))
        return {"logits": logits_per_unit, "masks": masks, "macs": macs, "hidden_states": hidden_states,
                "live_channels": len(live)}

    def _shortcut(self, shortcut, hidden, live):
        if isinstance(shortcut, ZeroPadShortCut):
            return (F.avg_pool2d(hidden, shortcut.stride) if shortcut.stride != 1 else hidden), live
        if isinstance(shortcut, ResNetShortCut):
            conv, norm = shortcut.convolution, shortcut.normalization
            out = F.conv2d(hidden, conv.weight[:, live], None, conv.stride)
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            out = out * scale[:, None, None] + (norm.bias - norm.running_mean * scale)[:, None, None]
            return out, torch.arange(conv.out_channels, device=hidden.device)
        return hidden, live


class FTWTForImageClassification(FTWTPreTrainedModel):
    """The masked CNN with a linear classifier on its pooled features (the official CIFAR heads)."""

    def __init__(self, config: FTWTConfig):
        super().__init__(config)
        self.ftwt = FTWTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @classmethod
    def from_resnet(cls, resnet, **ftwt_kwargs) -> FTWTForImageClassification:
        """FTWT around a transformers `ResNetModel` or `ResNetForImageClassification` (weights copied; the
        predictors are new). `ftwt_kwargs`: other `FTWTConfig` fields (mass_threshold, mask_mode, ...)."""
        resnet_config = getattr(resnet, "config", None)
        if getattr(resnet_config, "model_type", None) != "resnet":
            raise ValueError(f"from_resnet needs a transformers ResNetModel or ResNetForImageClassification, got "
                             f"{type(resnet).__name__} (model_type {getattr(resnet_config, 'model_type', None)!r}); "
                             "FTWT supports ResNet and VGG convolution units only")
        image_size = ftwt_kwargs.pop("image_size", 224)
        config = FTWTConfig(backbone="resnet", resnet_config=resnet_config.to_dict(), stem_type="imagenet",
                            shortcut_type="projection", num_channels=resnet_config.num_channels,
                            image_size=image_size, num_labels=resnet_config.num_labels,
                            id2label=resnet_config.id2label, **ftwt_kwargs)
        model = cls(config)
        body = resnet.resnet if hasattr(resnet, "resnet") else resnet
        missing, unexpected = model.ftwt.load_state_dict(body.state_dict(), strict=False)
        if unexpected or any(not key.startswith("mask_predictors.") for key in missing):
            raise ValueError(f"the ResNet's weights do not fit: missing {missing}, unexpected {unexpected}")
        if hasattr(resnet, "classifier"):
            linear = resnet.classifier[-1]
            model.classifier.load_state_dict(linear.state_dict())
        return model.to(resnet.device)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                sparse: bool | None = None, mask_targets: bool | None = None,
                **kwargs) -> FTWTImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.ftwt(pixel_values, output_hidden_states=output_hidden_states, return_dict=True, sparse=sparse,
                            mask_targets=mask_targets)
        pooled = outputs.pooler_output
        logits = self.classifier(pooled)
        # the classifier needs only the channels that can be non-zero
        macs = outputs.macs + self.config.num_labels * outputs.live_channels
        loss = m_loss = None
        if outputs.ground_truth_masks is not None:
            m_loss = mask_loss(outputs.mask_logits, outputs.ground_truth_masks)
        if labels is not None:
            loss = self.loss_function(labels.to(logits.device), logits, self.config)
            if m_loss is not None:
                loss = loss + m_loss
        output = FTWTImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, mask_loss=m_loss,
            mask_logits=outputs.mask_logits, masks=outputs.masks, ground_truth_masks=outputs.ground_truth_masks,
            macs=macs, predictor_macs=outputs.predictor_macs)
        return output if return_dict else output.to_tuple()

    def dense_macs(self) -> int:
        """Multiply-accumulates per image of the unpruned model (convolutions and classifier)."""
        return self.ftwt.dense_macs() + self.config.hidden_size * self.config.num_labels


__all__ = ["FTWTPreTrainedModel", "FTWTModel", "FTWTForImageClassification", "MaskPredictor", "ground_truth_mask",
           "uniform_ground_truth_mask", "mask_loss"]
