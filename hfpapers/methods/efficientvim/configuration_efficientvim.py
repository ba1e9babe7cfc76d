"""Configuration of EfficientViM (Lee et al., "EfficientViM: Efficient Vision Mamba with Hidden State Mixer
based State Space Duality", CVPR 2025, arXiv 2411.15241)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig



@strict
class EfficientViMConfig(PreTrainedConfig):
    r"""
    image_size (`int`): the resolution the presets were trained at (224, or 256 for M4); it sets the image
        processor's size. The model accepts any height and width (see `EfficientViMModel.forward`).
    num_channels (`int`): input channels.
    embed_dim (`list[int]`): channels of the three stages.
    depths (`list[int]`): EfficientViM blocks per stage.
    state_dim (`list[int]`): N, the number of hidden-state tokens of the HSM-SSD in each stage.
    mlp_ratio (`float`): expansion of the FFN branch.
    ssd_expand (`float`): expansion of the HSM-SSD's inner width: `hz_proj` maps the C-channel hidden state to
        2 * ssd_expand * C channels, `out_proj` back to C (1 in every published model).
    distillation (`bool`): add the DeiT-style distillation head (the `*-dist` models).
    layer_norm_eps (`float`): eps of the channel LayerNorms.
    batch_norm_eps (`float`): eps of the BatchNorms.
    alpha_init (`float`): initial value of the branch gates' logits (`sigmoid(alpha)` mixes each branch in).
    initializer_range (`float`): std of the truncated-normal init of the classifier heads.
    """

    model_type = "hfp-efficientvim"

    image_size: int = 224
    num_channels: int = 3
    embed_dim: list[int] | tuple[int, ...] = (128, 192, 320)
    depths: list[int] | tuple[int, ...] = (2, 2, 2)
    state_dim: list[int] | tuple[int, ...] = (49, 25, 9)
    mlp_ratio: float | int = 4.0
    ssd_expand: float | int = 1.0
    distillation: bool = False
    layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 1e-5
    alpha_init: float = 1e-4
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers only warns when a folder of another model is loaded, then builds this one from defaults
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{config_dict['model_type']!r} config given to {cls.__name__} ({cls.model_type!r}): "
                             "load that folder with its own class or an Auto class")
        return super().from_dict(config_dict, **kwargs)

    def validate_efficientvim(self):
        lengths = {len(self.embed_dim), len(self.depths), len(self.state_dim)}
        if lengths != {3}:
            raise ValueError(
                f"embed_dim, depths and state_dim need one entry per stage (3), got {list(self.embed_dim)}, "
                f"{list(self.depths)}, {list(self.state_dim)}"
            )
        for name in ("embed_dim", "depths", "state_dim"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} entries must be positive, got {list(getattr(self, name))}")
        if self.embed_dim[0] % 8:
            raise ValueError(f"embed_dim[0] must be a multiple of 8 (the stem uses D/8 channels), got {self.embed_dim[0]}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1 (1 = regression), got {self.num_labels}")


__all__ = ["EfficientViMConfig"]
