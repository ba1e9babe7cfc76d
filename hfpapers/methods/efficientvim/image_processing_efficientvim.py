"""Image processing of EfficientViM as the official evaluation: resize the short side to size / 0.875 (bicubic),
centre-crop to size, ImageNet mean/std. transformers' ConvNeXT processor does exactly this (`crop_pct`), so
checkpoints carry a standard processor config and load without custom code."""

from transformers import ConvNextImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


def build_image_processor(config) -> ConvNextImageProcessorPil:
    if config.num_channels != 3:
        raise ValueError(f"the image processor produces RGB images; the config expects {config.num_channels} channels")
    return ConvNextImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_pct=0.875,
        resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )
