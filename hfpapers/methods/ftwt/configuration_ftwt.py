"""Configuration of "Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised Mask Prediction"
(FTWT, arXiv 2110.08232)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, ResNetConfig
from transformers.configuration_utils import SubConfigSpec

BACKBONES = ("resnet", "vgg")
STEM_TYPES = ("imagenet", "cifar")
SHORTCUT_TYPES = ("projection", "zero-pad")
GT_TYPES = ("mass", "uniform")
MASK_MODES = ("decoupled", "joint")


@strict
class FTWTConfig(PreTrainedConfig):
    r"""
    A CNN whose every convolution unit (conv -> BatchNorm -> activation) is gated per input by a mask predictor:
    the unit's input is globally average-pooled, soft-maxed over channels and mapped by a 1x1 convolution to one
    logit per output filter; filters whose sigmoid is at most 0.5 are switched off ("fire together, wire together":
    the previous layer's activations decide which filters of this layer run). The predictors learn from
    self-supervised targets: the smallest-activation filters of each unit's own output (Sec. 3 of the paper,
    `get_gt_mask_ratio` of the official code).

    backbone (`str`): "resnet" (transformers' ResNet modules, configured by `resnet_config`) or "vgg".
    resnet_config (`ResNetConfig` or `dict`): the ResNet (depths, hidden_sizes, embedding_size, layer_type);
        its `num_channels` follows `num_channels`. Ignored for "vgg".
    stem_type (`str`): "imagenet" (transformers' 7x7 stride-2 conv and 3x3 max pool) or "cifar" (one 3x3
        stride-1 conv, no pool, as the CIFAR ResNets of the official code).
    shortcut_type (`str`): "projection" (transformers' 1x1 conv + BN where the shape changes) or "zero-pad"
        (parameter-free: 2x2 average pool and zero channels, the official CIFAR ResNet's `downsample_basic_block`).
    vgg_stages (`list[list[int]]`): for "vgg", the widths of the 3x3 convolutions of each stage; every stage ends
        in a 2x2 max pool (VGG-16 is [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3]).
    image_size (`int`): side of the square input image.
    num_channels (`int`): channels of the input image.
    gt_type (`str`): the self-supervised target: "mass" (keep the top filters holding `mass_threshold` of the
        activation mass) or "uniform" (drop the `pruning_ratio` lowest filters of every unit).
    mass_threshold (`float`): r of the paper, in (0, 1]; 1 drops only dead filters (`--mthresh`).
    pruning_ratio (`float`): for "uniform", the fraction of filters to drop, in [0, 1).
    mask_mode (`str`): "decoupled" (predictors see the detached input: the mask loss never reaches the backbone)
        or "joint".
    predictor_softmax (`bool`): softmax over channels after the pooling (`--softmax 1`, the official default).
    masking (`bool`): apply the predicted masks; False runs the dense backbone (predictors and targets are still
        computed, so a dense model can be trained or compared with the same weights).
    sparse_inference (`bool`): in eval mode, run only the predicted filters (sliced convolutions, one image at a
        time) instead of multiplying dense outputs by the masks; the outputs agree.
    """

    model_type = "hfp-ftwt"
    sub_configs = {"resnet_config": ResNetConfig}
    sub_configs_defaults = {"resnet_config": SubConfigSpec(config_class=ResNetConfig, optional=True)}

    backbone: str = "resnet"
    resnet_config: dict | PreTrainedConfig | None = None
    stem_type: str = "cifar"
    shortcut_type: str = "zero-pad"
    vgg_stages: list | None = None
    image_size: int = 32
    num_channels: int = 3
    gt_type: str = "mass"
    mass_threshold: float = 1.0
    pruning_ratio: float = 0.0
    mask_mode: str = "decoupled"
    predictor_softmax: bool = True
    masking: bool = True
    sparse_inference: bool = False

    def __post_init__(self, **kwargs):
        if self.backbone == "resnet" and self.resnet_config is None:
            # ResNet-56 for CIFAR, the official default
            self.resnet_config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[9, 9, 9],
                                                layer_type="basic", downsample_in_first_stage=False)
        super().__post_init__(**kwargs)
        if self.backbone == "vgg" and self.vgg_stages is None:
            self.vgg_stages = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
        if isinstance(self.resnet_config, ResNetConfig):
            self.resnet_config.num_channels = self.num_channels
        if self.vgg_stages is not None:
            self.vgg_stages = [list(stage) for stage in self.vgg_stages]

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers only warns when a folder of another model is loaded, then builds this one from defaults
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{config_dict['model_type']!r} config given to {cls.__name__} ({cls.model_type!r}): "
                             "load that folder with its own class or an Auto class")
        return super().from_dict(config_dict, **kwargs)

    def validate_ftwt(self):
        for name, allowed in (("backbone", BACKBONES), ("stem_type", STEM_TYPES), ("shortcut_type", SHORTCUT_TYPES),
                              ("gt_type", GT_TYPES), ("mask_mode", MASK_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("image_size", "num_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {self.num_labels}")
        if not 0 < self.mass_threshold <= 1:
            raise ValueError(f"mass_threshold (the kept share of activation mass) must lie in (0, 1], "
                             f"got {self.mass_threshold}")
        if not 0 <= self.pruning_ratio < 1:
            raise ValueError(f"pruning_ratio (the share of filters dropped) must lie in [0, 1), "
                             f"got {self.pruning_ratio}")
        if self.backbone == "resnet":
            resnet = self.resnet_config
            if not isinstance(resnet, ResNetConfig):
                raise ValueError(f"resnet_config must be a ResNetConfig (model_type 'resnet') for backbone='resnet', "
                                 f"got {getattr(resnet, 'model_type', type(resnet).__name__)!r}")
            if len(resnet.depths) != len(resnet.hidden_sizes) or min(resnet.depths, default=0) < 1:
                raise ValueError(f"resnet_config needs one depth >= 1 per hidden size, got depths {resnet.depths} "
                                 f"and hidden_sizes {resnet.hidden_sizes}")
            if resnet.layer_type == "bottleneck" and self.shortcut_type == "zero-pad":
                raise ValueError("shortcut_type='zero-pad' is the CIFAR BasicBlock shortcut; use 'projection' "
                                 "with layer_type='bottleneck'")
        elif not self.vgg_stages or any(not stage or min(stage) < 1 for stage in self.vgg_stages):
            raise ValueError(f"vgg_stages must be a non-empty list of non-empty lists of positive widths, "
                             f"got {self.vgg_stages}")

    @property
    def hidden_size(self) -> int:
        """Channels of the last feature map (the classifier's input)."""
        return self.resnet_config.hidden_sizes[-1] if self.backbone == "resnet" else self.vgg_stages[-1][-1]


__all__ = ["FTWTConfig"]
