"""R-AMT's adapter: binary masks on the frozen weights of CLIP's image encoder (arXiv 2307.15049, Sec. 3.2; official
`code/modules/masklayers.py`).

Each target weight W gets a real-valued mask M_real of its shape, initialised at `mask_scale` = 1e-2. The forward
uses W * 1[M_real > threshold] with threshold 5e-3, so every mask starts at 1 and training starts as exact
zero-shot CLIP; the backward is the straight-through estimator (dL/dM_real = dL/dM_bin). Only the masks train.
Targets are the attention projections of every vision block plus the patch embedding (the official `MASK_MLP:
False` setting: fused QKV `in_proj_weight`, `out_proj` and `conv1`); `fc1` / `fc2` are the official MLP option.

Saved as peft saves an adapter (`adapter_config.json` + `adapter_model.safetensors`), but with each mask bit-packed
(1 bit per weight, as the official checkpoints store them), so not through peft: peft's saver writes the adapter's
float parameters and has no hook for another encoding, and a binary mask that multiplies a weight is no additive
delta that peft's merge could fold. `merge()` folds the masks into the weights and gives back a plain CLIP model.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, CLIPConfig, CLIPModel, CLIPVisionModel
from transformers.modeling_outputs import ImageClassifierOutput

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FOLDER = "base_model"  # where a base built from a config (no Hub id or folder) is saved with the adapter
ADAPTER_TYPE = "r-amt"
# The official targets (`MASK_MLP: False`); fc1 / fc2 are its MLP option.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "patch_embedding")
MASKABLE = (*DEFAULT_TARGETS, "fc1", "fc2")
IN_PROJ = ("q_proj", "k_proj", "v_proj")  # fused into one `in_proj_weight` (and one mask) officially
DEFAULT_TEMPLATES = ("a photo of a {}.",)  # the official CUSTOM_TEMPLATES of ImageNet, SUN397, Caltech101, cars


@dataclass
class RAmtConfig:
    """The adapter's settings (`adapter_config.json`)."""

    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    mask_scale: float = 1e-2  # the initial value of every real-valued mask ('1s' init)
    threshold: float = 5e-3  # M_bin = 1[M_real > threshold]
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        unknown = sorted(set(self.target_modules) - set(MASKABLE))
        if not self.target_modules or unknown:
            raise ValueError(f"target_modules must be a non-empty subset of {list(MASKABLE)} (the vision tower's "
                             f"attention projections, patch embedding and MLP); got unknown {unknown or 'none'}")
        if not (math.isfinite(self.mask_scale) and math.isfinite(self.threshold)) or not \
                0 <= self.threshold < self.mask_scale:
            raise ValueError(f"threshold must satisfy 0 <= threshold < mask_scale, so that every mask starts at 1 "
                             f"and training starts as zero-shot CLIP; got threshold={self.threshold}, "
                             f"mask_scale={self.mask_scale}")


class Binarizer(torch.autograd.Function):
    """1[M_real > threshold] forward, the identity backward (straight-through; official `Binarizer`)."""

    @staticmethod
    def forward(ctx, mask_real: torch.Tensor, threshold: float) -> torch.Tensor:
        return (mask_real > threshold).to(mask_real.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


class MaskedLayer(nn.Module):
    """A frozen `nn.Linear` or `nn.Conv2d` (`base_layer`) whose weight is multiplied by a binarised mask."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, mask_scale: float, threshold: float):
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.mask_real = nn.Parameter(torch.full_like(base_layer.weight, mask_scale))
        self.threshold = threshold
        self.use_mask = True  # False: the layer computes with its original weight (the zero-shot teacher)

    @property
    def weight(self) -> torch.Tensor:
        """The original weight (transformers reads its dtype, e.g. CLIP's patch embedding)."""
        return self.base_layer.weight

    def binary_mask(self) -> torch.Tensor:
        return self.mask_real > self.threshold

    def masked_weight(self) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.mask_real.requires_grad):  # inference: no autograd node to build
            return self.base_layer.weight * self.binary_mask()
        return self.base_layer.weight * Binarizer.apply(self.mask_real, self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.masked_weight() if self.use_mask else self.base_layer.weight
        if isinstance(self.base_layer, nn.Conv2d):
            return self.base_layer._conv_forward(x, weight, self.base_layer.bias)
        return F.linear(x, weight, self.base_layer.bias)


def _vision_tower(model: nn.Module) -> CLIPVisionModel:
    """The CLIP image encoder inside `model` (a CLIPModel, a CLIPVisionModel or one that holds one)."""
    for module in model.modules():
        if isinstance(module, CLIPVisionModel):
            return module
    raise ValueError(f"R-AMT masks the attention blocks of a CLIP image encoder: expected a transformers CLIPModel "
                     f"or CLIPVisionModel, got a {type(model).__name__} without one")


def _check_class_name(tokenizer, name: str) -> None:
    ids = tokenizer(name, add_special_tokens=False)["input_ids"]
    if not [i for i in ids if i != tokenizer.unk_token_id]:
        raise ValueError(f"class name {name!r} tokenizes to nothing the text encoder knows (ids {ids}); give "
                         f"class names in words of the tokenizer's vocabulary")


@torch.no_grad()
def zero_shot_classifier(clip: CLIPModel, tokenizer, class_names, templates=DEFAULT_TEMPLATES) -> torch.Tensor:
    """(num_classes, projection_dim) unit class embeddings: each class's prompts through the text encoder, their
    embeddings averaged and normalised (official `TextEncoder.forward`: names lower-cased, '_' -> ' ')."""
    if not isinstance(clip, CLIPModel):
        raise ValueError(f"a zero-shot classifier needs CLIP's text encoder: expected a CLIPModel, got "
                         f"{type(clip).__name__}")
    if not class_names or not templates or any("{}" not in t for t in templates):
        raise ValueError(f"expected class names and prompt templates with a '{{}}' each; got {list(class_names)} "
                         f"and {list(templates)}")
    rows = []
    for name in class_names:
        name = name.replace("_", " ").lower()
        _check_class_name(tokenizer, name)
        inputs = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
        inputs = {k: v.to(clip.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        rows.append(clip.get_text_features(**inputs).pooler_output.mean(0))
    embeddings = torch.stack(rows)
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as uint8 bytes, 8 weights a byte, first weight in the highest bit (as the official save)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy()))


def _unpack(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape)).astype(bool)).reshape(shape)


class MaskTunedCLIP(nn.Module):
    """A CLIP model (`base_model`) whose image-encoder weights carry R-AMT's binary masks.

    `model(input_ids=..., pixel_values=...)` is the base model's forward (so transformers' zero-shot-image-
    classification pipeline runs on it); `model(pixel_values=...)` classifies among the classes of `set_classes`
    (cached text embeddings); `use_masks=False` runs the original weights (zero-shot CLIP). Other attributes
    (`config`, `device`, `get_image_features`, ...) are the base model's. On a CLIPVisionModel, `model(pixel_values)`
    is the masked encoder's own forward.
    """

    def __init__(self, base_model: nn.Module, config: RAmtConfig):
        super().__init__()
        vision = _vision_tower(base_model)
        self.base_model = base_model
        self.mask_config = config
        base_model.requires_grad_(False)
        for name, module in list(vision.named_modules()):
            if name.rpartition(".")[2] in config.target_modules and isinstance(module, (nn.Linear, nn.Conv2d)):
                parent, _, child = name.rpartition(".")
                setattr(vision.get_submodule(parent), child, MaskedLayer(module, config.mask_scale, config.threshold))
        self.register_buffer("class_embeddings", None, persistent=False)
        self.class_names: list[str] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @classmethod
    def from_configs(cls, base: dict, adapter: dict, base_model: str | None = None,
                     **base_overrides) -> "MaskTunedCLIP":
        """`base`: a `CLIPConfig` dict for a randomly initialised CLIP, unless `base_model` (a Hub id or folder)
        names real weights; `adapter`: `RAmtConfig` values."""
        if base_model is not None:
            model = AutoModel.from_pretrained(base_model, **base_overrides)
        else:
            model = CLIPModel(CLIPConfig(**base, **base_overrides))
        return cls(model, RAmtConfig(**adapter, base_model_name_or_path=base_model))

    def masked_layers(self) -> dict[str, MaskedLayer]:
        """Module name (in `base_model`) -> its masked layer."""
        return {name: m for name, m in self.base_model.named_modules() if isinstance(m, MaskedLayer)}

    @contextlib.contextmanager
    def masks_disabled(self):
        """The original weights inside the block: zero-shot CLIP, the teacher of the KL term."""
        layers = self.masked_layers().values()
        for layer in layers:
            layer.use_mask = False
        try:
            yield self
        finally:
            for layer in layers:
                layer.use_mask = True

    def masked_fraction(self) -> float:
        """The share of masked weights that the binary mask removes (the paper's "masked parameters")."""
        layers = self.masked_layers().values()
        removed = sum(int((~layer.binary_mask()).sum()) for layer in layers)
        return removed / sum(layer.mask_real.numel() for layer in layers)

    def mask_penalty(self) -> torch.Tensor:
        """Sum over the official mask parameters of ||M_real||_2 (`RegLoss(param, 2)`: the norm, not its square).
        The official attention has one fused `in_proj` mask, so a block's q, k and v masks share one norm."""
        squares = {}
        for name, layer in self.masked_layers().items():
            block, _, projection = name.rpartition(".")
            key = f"{block}.in_proj" if projection in IN_PROJ else name
            squares[key] = squares.get(key, 0) + layer.mask_real.square().sum()
        return sum(total.sqrt() for total in squares.values())

    def set_classes(self, class_names, tokenizer, templates=DEFAULT_TEMPLATES) -> None:
        """Cache the zero-shot classifier of `class_names` (the text encoder is frozen and unmasked)."""
        self.class_embeddings = zero_shot_classifier(self.base_model, tokenizer, class_names, templates)
        self.class_names = list(class_names)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None, *,
                use_masks: bool = True, **kwargs):
        context = contextlib.nullcontext() if use_masks else self.masks_disabled()
        with context:
            if input_ids is not None or "inputs_embeds" in kwargs:
                return self.base_model(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
            if self.class_embeddings is None:
                if not isinstance(self.base_model, CLIPModel):  # an image encoder alone: its own forward
                    return self.base_model(pixel_values=pixel_values, **kwargs)
                raise ValueError("model(pixel_values=...) classifies among the classes of set_classes(...), which "
                                 "was not called; pass input_ids for CLIP's own forward")
            image = self.base_model.get_image_features(pixel_values=pixel_values).pooler_output
            image = image / image.norm(dim=-1, keepdim=True)
            return ImageClassifierOutput(logits=self.base_model.logit_scale.exp() * image @ self.class_embeddings.T)

    @contextlib.contextmanager
    def _plain_layers(self):
        """The base model with its original layers in place of the masked ones, inside the block."""
        layers = self.masked_layers()
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent), child, layer.base_layer)
        try:
            yield self.base_model
        finally:
            for name, layer in layers.items():
                parent, _, child = name.rpartition(".")
                setattr(self.base_model.get_submodule(parent), child, layer)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """`adapter_config.json` + the bit-packed masks in `adapter_model.safetensors` (uint8, 1 bit per weight).
        A base model that is not a Hub id or folder (built from a config) is saved beside them in `base_model/`."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        base = self.mask_config.base_model_name_or_path
        if base is None:
            with self._plain_layers() as plain:
                plain.save_pretrained(folder / BASE_FOLDER)
            base = BASE_FOLDER
        elif Path(base).is_dir():  # a folder inside the adapter's travels with it
            base_path = Path(base).resolve()
            base = str(base_path.relative_to(folder.resolve())) if base_path.is_relative_to(folder.resolve()) \
                else str(base_path)
        packed = {name: _pack(layer.binary_mask()) for name, layer in self.masked_layers().items()}
        save_file(packed, folder / ADAPTER_WEIGHTS, metadata={"format": "pt", "bits_per_weight": "1"})
        config = {"adapter_type": ADAPTER_TYPE, **asdict(self.mask_config), "base_model_name_or_path": base}
        config["target_modules"] = list(config["target_modules"])
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder, base_model: nn.Module | None = None) -> "MaskTunedCLIP":
        """A saved adapter on `base_model` (default: the base its config names, relative to the folder when it is
        one inside it). Reads JSON and safetensors only."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
            raise ValueError(f"{folder}: expected an R-AMT adapter folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        values = json.loads((folder / ADAPTER_CONFIG).read_text())
        if values.pop("adapter_type", None) != ADAPTER_TYPE:
            raise ValueError(f"{folder / ADAPTER_CONFIG} is not an R-AMT adapter config (adapter_type != "
                             f"{ADAPTER_TYPE!r})")
        config = RAmtConfig(**values)
        if base_model is None:
            base = config.base_model_name_or_path
            base_model = AutoModel.from_pretrained(folder / base if (folder / base).is_dir() else base)
        model = cls(base_model, config)
        packed = load_file(folder / ADAPTER_WEIGHTS)
        layers = model.masked_layers()
        if packed.keys() != layers.keys():
            raise ValueError(f"{folder / ADAPTER_WEIGHTS} does not fit this base model: missing "
                             f"{sorted(layers.keys() - packed.keys())[:5]}, unexpected "
                             f"{sorted(packed.keys() - layers.keys())[:5]}")
        for name, layer in layers.items():
            shape = layer.mask_real.shape
            if packed[name].dtype != torch.uint8 or packed[name].numel() != math.ceil(math.prod(shape) / 8):
                raise ValueError(f"{name}: expected {math.ceil(math.prod(shape) / 8)} packed uint8 bytes for a "
                                 f"{tuple(shape)} mask, got {packed[name].numel()} {packed[name].dtype}")
            # kept weights decode to 1 and removed ones to 0, as the official `load_model`
            layer.mask_real.data = _unpack(packed[name], shape).to(layer.mask_real)
        return model

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The base model with W * M_bin folded into each masked weight and plain layers again: a standard
        CLIPModel / CLIPVisionModel with no inference cost. The masks are consumed (this wrapper is spent)."""
        for name, layer in self.masked_layers().items():
            layer.base_layer.weight.mul_(layer.binary_mask())
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent), child, layer.base_layer)
        self.base_model.requires_grad_(True)
        return self.base_model


__all__ = ["Binarizer", "MaskTunedCLIP", "MaskedLayer", "RAmtConfig", "zero_shot_classifier"]
