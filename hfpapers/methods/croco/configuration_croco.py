"""Configuration of CroCo / CroCo v2 (cross-view completion pre-training; arXiv 2210.10716 and 2211.10408)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

POSITION_EMBEDDINGS = ("cosine", "rope")


@strict
class CroCoConfig(PreTrainedConfig):
    r"""
    CroCo: a ViT encoder shared by two views of one scene (view 1 masked, view 2 whole), and a decoder whose
    blocks attend to themselves, then to view 2's tokens, then apply an MLP; a linear head predicts the masked
    patches of view 1. Defaults are the official `CroCoNet` (ViT-B/16 encoder, 512-d 8-block decoder).

    image_size (`int`): side of the square images the model is trained and processed at; the model itself takes
        any height and width that are multiples of `patch_size` (both views of one size).
    patch_size (`int`): side of the square patches.
    mask_ratio (`float`): share of view 1's patches that are masked, in (0, 1); `int(mask_ratio * patches)` are.
    hidden_size / num_hidden_layers / num_attention_heads (`int`): the encoder (official `enc_embed_dim`,
        `enc_depth`, `enc_num_heads`).
    decoder_hidden_size / decoder_num_hidden_layers / decoder_num_attention_heads (`int`): the decoder.
    mlp_ratio (`float`): the MLPs' inner width is `int(mlp_ratio * width)`.
    layer_norm_eps (`float`): epsilon of every LayerNorm.
    norm_reference_in_decoder (`bool`): LayerNorm view 2's tokens before each cross-attention (`norm_im2_in_dec`).
    position_embedding (`str`): "cosine" (CroCo v1: fixed 2D sin-cos added to the tokens) or "rope" (CroCo v2:
        2D rotary embedding of queries and keys in every attention).
    rope_base (`float`): the rotary base frequency (`RoPE100` in the official names).
    norm_pix_loss (`bool`): normalise each target patch by its own mean and variance (the pre-training default).
    eval_mask_seed (`int`): in eval mode, without an explicit mask, every image gets the same mask drawn from this
        seed, so evaluation is deterministic and one image's result does not depend on the batch.
    initializer_range (`float`): std of the mask token's normal init (linear layers use Xavier-uniform as the
        official code).
    """

    model_type = "hfp-croco"

    image_size: int = 224
    patch_size: int = 16
    mask_ratio: float = 0.9
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    norm_reference_in_decoder: bool = True
    position_embedding: str = "cosine"
    rope_base: float = 100.0
    norm_pix_loss: bool = True
    eval_mask_seed: int = 0
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers only warns when a folder of another model is loaded, then builds this one from defaults
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{config_dict['model_type']!r} config given to {cls.__name__} ({cls.model_type!r}): "
                             "load that folder with its own class or an Auto class")
        return super().from_dict(config_dict, **kwargs)

    def validate_croco(self):
        for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {self.mask_ratio}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if int(self.mask_ratio * self.num_patches) in (0, self.num_patches):
            raise ValueError(f"mask_ratio={self.mask_ratio} masks {int(self.mask_ratio * self.num_patches)} of "
                             f"{self.num_patches} patches; at least one must be masked and one visible")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got "
                             f"{self.position_embedding!r}")
        for width, heads in ((self.hidden_size, self.num_attention_heads),
                             (self.decoder_hidden_size, self.decoder_num_attention_heads)):
            if width % heads:
                raise ValueError(f"width {width} is not divisible by its {heads} attention heads")
            # 2D RoPE splits each head in a y and an x half, each rotated in pairs; sin-cos splits the width in 4
            if self.position_embedding == "rope" and (width // heads) % 4:
                raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {width // heads}")
            if self.position_embedding == "cosine" and width % 4:
                raise ValueError(f"2D sin-cos position embeddings need a width divisible by 4, got {width}")
        if self.rope_base <= 0:
            raise ValueError(f"rope_base must be positive, got {self.rope_base}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_masked(self) -> int:
        """Patches masked per image at `image_size` (the official `int(mask_ratio * num_patches)`)."""
        return int(self.mask_ratio * self.num_patches)


__all__ = ["CroCoConfig"]
