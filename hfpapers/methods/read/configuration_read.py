"""Configuration of READ, "Reasoning to Attend: Try to Understand How <SEG> Token Works" (Qian et al., CVPR 2025,
arXiv 2412.17741)."""

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, PreTrainedConfig, SamConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class READConfig(PreTrainedConfig):
    r"""
    A LLaVA multimodal LM that answers with a `[SEG]` token, and SAM, which decodes the mask of what `[SEG]` refers
    to. READ's Similarity-as-Points (SasP) turns the similarity of the `[SEG]` state with the image-token states into
    point prompts for SAM (official `similarity_map_to_points`); `use_sasp=False` is LISA (the `[SEG]` embedding is
    SAM's only prompt). The defaults are READ-7B's.

    llava_config (`LlavaConfig` or `dict`): the multimodal LM (LLaVA-1.5: CLIP ViT-L/14-336 + Vicuna).
    sam_config (`SamConfig` or `dict`): the segmenter (SAM ViT-H).
    base_llava (`str`, *optional*), base_sam (`str`, *optional*): Hub ids or folders the weights came from.
    seg_token_index (`int`, *optional*): id of the added `[SEG]` token.
    out_dim (`int`, *optional*): size of the projected `[SEG]` embedding (`text_hidden_fcs`); SAM's prompt size when
        unset, which it must equal.
    use_sasp (`bool`): prompt SAM with SasP points as well as the `[SEG]` embedding (READ) or with the embedding
        alone (LISA).
    t_pos (`float`), t_neg (`float`): cells of the normalised similarity map >= `t_pos` are positive points, cells in
        [0, `t_neg`] negative, the rest neutral (label -1, "not a point" for SAM).
    num_points (`int`): points kept after ordering [positives by descending, negatives by ascending similarity,
        neutrals] (30 for READ-7B, 60 in the code's 13B test setting).
    down_sample (`int`): the image-token grid is bilinearly shrunk by this factor before picking points (2 for 7B:
        24x24 -> 12x12; 1 for 13B).
    lora_r (`int`), lora_alpha (`int`), lora_dropout (`float`), lora_target_modules (`list[str]`): the LoRA on the
        language model (official: r=8, alpha=16, dropout 0.05 on q_proj and v_proj); `lora_r=0` adds none.
    ce_loss_weight (`float`), bce_loss_weight (`float`), dice_loss_weight (`float`): weights of the text
        cross-entropy and of the mask BCE and DICE losses (official 1.0 / 2.0 / 0.5).
    """

    model_type = "hfp-read"
    sub_configs_defaults = {
        "llava_config": SubConfigSpec(config_class=LlavaConfig),
        "sam_config": SubConfigSpec(config_class=SamConfig),
    }

    llava_config: dict | PreTrainedConfig | None = None
    sam_config: dict | PreTrainedConfig | None = None
    base_llava: str | None = None
    base_sam: str | None = None
    seg_token_index: int | None = None
    out_dim: int | None = None
    use_sasp: bool = True
    t_pos: float = 0.8
    t_neg: float = 0.2
    num_points: int = 30
    down_sample: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj")
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers only warns when a folder of another model is loaded, then builds this one from defaults
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{config_dict['model_type']!r} config given to {cls.__name__} ({cls.model_type!r}): "
                             "load that folder with its own class or an Auto class")
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.out_dim is None:
            self.out_dim = self.sam_config.prompt_encoder_config.hidden_size
        self.lora_target_modules = list(self.lora_target_modules)

    @property
    def image_grid(self) -> int:
        """Side of the image-token grid of the vision tower (24 for CLIP ViT-L/14 at 336 px)."""
        vision = self.llava_config.vision_config
        return vision.image_size // vision.patch_size

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """LLaVA's language-model config: the vocabulary (with `[SEG]`) and embeddings this model uses."""
        return self.llava_config.get_text_config(decoder=decoder, encoder=encoder)

    def validate_read(self):
        sam_prompt = self.sam_config.prompt_encoder_config.hidden_size
        if self.out_dim != sam_prompt:
            raise ValueError(f"out_dim ({self.out_dim}) must equal SAM's prompt size ({sam_prompt}): the projected "
                             "[SEG] embedding is one of SAM's prompt tokens")
        if not 0.0 <= self.t_neg < self.t_pos <= 1.0:
            raise ValueError(f"need 0 <= t_neg < t_pos <= 1, got t_neg={self.t_neg}, t_pos={self.t_pos}")
        if self.num_points < 1 or self.down_sample < 1 or self.lora_r < 0:
            raise ValueError(f"need num_points >= 1, down_sample >= 1 and lora_r >= 0, got {self.num_points}, "
                             f"{self.down_sample} and {self.lora_r}")
        if self.image_grid // self.down_sample < 1:
            raise ValueError(f"down_sample {self.down_sample} leaves no cell of the {self.image_grid}x"
                             f"{self.image_grid} image-token grid")
        strategy = self.llava_config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"READ reads one LM state per image patch (LLaVA-1.5's vision_feature_select_strategy "
                             f"'default'), got {strategy!r}")


__all__ = ["READConfig"]
