"""Image processing of the Scaling MLPs B-MLP: resize to the model's square resolution, scale to [0, 1],
normalise with the ImageNet mean/std (as the official code does for ImageNet-21k), channels first.

That is exactly what transformers' ViT image processor does, so a checkpoint carries a standard
`ViTImageProcessor` config and loads everywhere without custom code.
"""

from transformers import ViTImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


def build_image_processor(config) -> ViTImageProcessorPil:
    """A processor that produces exactly the (3, image_size, image_size) input `config` expects."""
    if config.num_channels != 3:
        raise ValueError(f"the image processor produces RGB images; the config expects {config.num_channels} channels")
    return ViTImageProcessorPil(
        size={"height": config.image_size, "width": config.image_size},
        resample=PILImageResampling.BILINEAR,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,  # grey-scale inputs become the three channels the model expects
    )
