"""Image processing of the Scaling MLPs B-MLP as the official evaluation loader: centre-crop the largest square,
resize it to the model's resolution with area interpolation, scale to [0, 1], normalise with the ImageNet mean/std
(as the official code does for ImageNet-21k), channels first.

Official: `get_loader` in data_utils/dataloader.py of github.com/gregorbachmann/scaling_mlps decodes test images
with FFCV's `CenterCropRGBImageDecoder(output_size=(res, res), ratio=1)`, which crops the centred min(H, W) square
(offsets (H - side) // 2, (W - side) // 2) and resizes it with OpenCV's INTER_AREA. transformers' Perceiver image
processor does exactly this order (centre crop of side `size / crop_size * min(H, W)`, then resize), and PIL's BOX
filter is area averaging, so a checkpoint carries a standard processor config and loads without custom code.
"""

from transformers import PerceiverImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


def build_image_processor(config) -> PerceiverImageProcessorPil:
    """A processor that produces exactly the (3, image_size, image_size) input `config` expects."""
    if config.num_channels != 3:
        raise ValueError(f"the image processor produces RGB images; the config expects {config.num_channels} channels")
    side = {"height": config.image_size, "width": config.image_size}
    return PerceiverImageProcessorPil(
        size=side,
        crop_size=side,  # size / crop_size = 1: the crop is the whole min(H, W) square
        resample=PILImageResampling.BOX,  # area interpolation (OpenCV INTER_AREA when shrinking)
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,  # grey-scale inputs become the three channels the model expects
    )
