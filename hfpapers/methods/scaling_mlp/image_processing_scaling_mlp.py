"""Image processor of the Scaling MLPs B-MLP: resize to the model's square resolution, scale to [0, 1],
normalise, and return channels-first `pixel_values` (the model flattens them in C, H, W order)."""

from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


class ScalingMLPImageProcessor(PilBackend):
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 64, "width": 64}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True  # grey-scale inputs become the three channels the model expects
    model_input_names = ["pixel_values"]

    @classmethod
    def for_config(cls, config, **kwargs):
        """A processor that produces exactly the input shape `config` expects."""
        if config.num_channels != 3:
            raise ValueError(f"the image processor produces RGB images; the config expects {config.num_channels} channels")
        return cls(size={"height": config.image_size, "width": config.image_size}, **kwargs)


__all__ = ["ScalingMLPImageProcessor"]
