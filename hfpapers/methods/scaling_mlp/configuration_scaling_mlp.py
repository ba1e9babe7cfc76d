"""Configuration of the bottleneck MLP of "Scaling MLPs: A Tale of Inductive Bias" (arXiv 2306.13575)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

NORM_TYPES = ("layer", "batch", "none")


@strict
class ScalingMLPConfig(PreTrainedConfig):
    r"""
    The B-MLP of the paper: the flattened image goes through `linear_in`, then `num_blocks` pre-norm
    inverted-bottleneck blocks `x + fc2(act(fc1(norm(x))))`, then `linear_out`. Preset names follow the
    paper's `B_<num_blocks>-Wi_<hidden_size>`.

    image_size (`int`): side of the square input image; the model sees `num_channels * image_size**2` values.
    num_channels (`int`): channels of the input image.
    num_blocks (`int`): number of residual blocks (the "B" of `B_12-Wi_1024`).
    hidden_size (`int`): width of the residual stream (the "Wi").
    expansion_factor (`int`): the block's inner width is `expansion_factor * hidden_size`.
    hidden_act (`str`): activation inside each block (the paper uses GELU).
    norm_type (`str`): "layer" (the paper's default), "batch" or "none".
    layer_norm_eps (`float`): epsilon of the norms.
    initializer_range (`float`): std of the normal init of linear weights; `None` keeps PyTorch's default init
        (what the official code uses).
    """

    model_type = "hfp-scaling-mlp"

    image_size: int = 64
    num_channels: int = 3
    num_blocks: int = 12
    hidden_size: int = 1024
    expansion_factor: int = 4
    hidden_act: str = "gelu"
    norm_type: str = "layer"
    layer_norm_eps: float = 1e-5
    initializer_range: float | None = None

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers only warns when a folder of another model is loaded, then builds this one from defaults
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{config_dict['model_type']!r} config given to {cls.__name__} ({cls.model_type!r}): "
                             "load that folder with its own class or an Auto class")
        return super().from_dict(config_dict, **kwargs)

    def validate_scaling_mlp(self):
        for name in ("image_size", "num_channels", "num_blocks", "hidden_size", "expansion_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1 (1 = regression), got {self.num_labels}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")

    @property
    def input_dim(self) -> int:
        """Length of the flattened (channels, height, width) image vector."""
        return self.num_channels * self.image_size * self.image_size


__all__ = ["ScalingMLPConfig"]
