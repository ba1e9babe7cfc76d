"""Image processing of the Scaling MLPs B-MLP as the official evaluation loader: centre-crop the largest square,
resize it to the model's resolution with area interpolation, scale to [0, 1], normalise with the ImageNet mean/std
(as the official code does for ImageNet-21k), channels first.

Official: `get_loader` in data_utils/dataloader.py of github.com/gregorbachmann/scaling_mlps decodes test images
with FFCV's `CenterCropRGBImageDecoder(output_size=(res, res), ratio=1)`: `get_center_crop` (ffcv/fields/rgb_image.py)
takes the centred min(H, W) square at offsets ((H - side) // 2, (W - side) // 2), and `resize` (libffcv/libffcv.cpp)
shrinks it into a uint8 image with OpenCV's `cv::resize(..., cv::INTER_AREA)`. transformers' Perceiver image
processor crops in exactly this way (a crop of side `size / crop_size * min(H, W)`, then the resize); only the
resize is replaced here, since PIL has no area interpolation (its BOX filter counts a source pixel whole or not at
all, up to 3.7/255 off on a 375x500 image).
"""

import numpy as np
from transformers import PerceiverImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


def area_weights(source: int, target: int) -> np.ndarray:
    """(target, source) weights of area interpolation along one axis: output pixel i covers the source interval
    [i * source / target, (i + 1) * source / target), and source pixel j counts with its overlap with it, divided by
    the interval's length (rows sum to 1). Shrinking, this is OpenCV's INTER_AREA; enlarging, OpenCV's INTER_AREA is
    the same two-tap weighting, computed in 11-bit fixed point (so within 1/255 of it)."""
    edges = np.arange(target + 1) * source / target
    j = np.arange(source)
    overlap = np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j)
    return np.clip(overlap, 0, None) * (target / source)


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(channels, H, W) -> (channels, height, width) by area interpolation. A uint8 image stays uint8, rounded half
    up as OpenCV rounds its area averages (the official loader decodes into uint8); other dtypes give float64."""
    resized = area_weights(image.shape[-2], height) @ image.astype(np.float64) @ area_weights(image.shape[-1], width).T
    if image.dtype == np.uint8:
        return np.floor(resized + 0.5).clip(0, 255).astype(np.uint8)
    return resized


class ScalingMLPImageProcessor(PerceiverImageProcessorPil):
    """Perceiver's centre crop of the largest square (`crop_size` = `size`), then `resample=BOX` resizes by exact
    area interpolation (`area_resize`) instead of PIL's BOX filter; any other `resample` is PIL's."""

    def resize(self, image: np.ndarray, size, resample=None, **kwargs) -> np.ndarray:
        if resample == PILImageResampling.BOX and size.height and size.width:
            return area_resize(image, size.height, size.width)
        return super().resize(image, size, resample=resample, **kwargs)

    def to_dict(self) -> dict:
        # `auto_map` names the class in transformers 5's per-backend form ({"pil": ...}). A bare path would make
        # every `pipeline()` ask whether to run remote code, even where this class is installed: pipelines also
        # look for a video processor, which they infer from the image processor's bare `auto_map` entry.
        output = super().to_dict()
        auto_map = output.get("auto_map", {})
        if isinstance(auto_map.get("AutoImageProcessor"), str):
            output["auto_map"] = {**auto_map, "AutoImageProcessor": {"pil": auto_map["AutoImageProcessor"]}}
        return output


def build_image_processor(config) -> ScalingMLPImageProcessor:
    """A processor that produces exactly the (3, image_size, image_size) input `config` expects."""
    if config.num_channels != 3:
        raise ValueError(f"the image processor produces RGB images; the config expects {config.num_channels} channels")
    side = {"height": config.image_size, "width": config.image_size}
    return ScalingMLPImageProcessor(
        size=side,
        crop_size=side,  # size / crop_size = 1: the crop is the whole min(H, W) square
        resample=PILImageResampling.BOX,  # area interpolation, as OpenCV's INTER_AREA
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,  # grey-scale inputs become the three channels the model expects
    )
