"""Configuration of the embedding models of "Pooling And Attention: What Are Effective Designs For LLM-Based
Embedding Models?" (Tang & Yang, arXiv 2409.02727)."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

POOLINGS = ("eos", "mean", "trainable", "multi_layer_trainable")
ATTENTIONS = ("causal", "bidirectional")
# The projections of Mistral / Llama / Qwen2 decoder layers: the official LoRA targets (`lora.json`).
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@strict
class TrainablePoolerConfig(PreTrainedConfig):
    r"""
    The trainable pooler of the paper (the official `PerceiverResampler`): learned latents are the queries of one
    cross-attention over the LLM states (keys and values), followed by a GEGLU feed-forward, both pre-norm with
    residuals onto the latents; the output is the mean over latents, L2-normalised. The defaults are the paper's
    (4096-d Mistral-7B: 768 latents, 32 heads of 2048 dims, about 1.28B parameters).

    hidden_size (`int`): size of the LLM states fed to the pooler (keys and values).
    latent_dim (`int`, *optional*): size of the latents and of the output embedding; `hidden_size` when unset
        (as in the official code).
    num_latents (`int`): number of learned latent queries.
    num_heads (`int`): attention heads.
    head_dim (`int`): size of each head; the attention's inner size is `num_heads * head_dim`.
    ffn_mult (`int`): the GEGLU's inner size is `ffn_mult * latent_dim` (its input projection is twice that).
    num_layers (`int`, *optional*): set for the multi-layer pooler: one state per decoder layer comes in, and a
        learned per-layer embedding (the paper's layer weight matrix) is added to it.
    layer_norm_eps (`float`): epsilon of the pre-norms.
    """

    model_type = "hfp-trainable-pooler"

    hidden_size: int = 4096
    latent_dim: int | None = None
    num_latents: int = 768
    num_heads: int = 32
    head_dim: int = 2048
    ffn_mult: int = 4
    num_layers: int | None = None
    layer_norm_eps: float = 1e-5

    @property
    def latent_size(self) -> int:
        """The latents' size: `latent_dim`, or `hidden_size` when it is unset."""
        return self.latent_dim if self.latent_dim is not None else self.hidden_size

    def validate_trainable_pooler(self):
        for name in ("hidden_size", "latent_size", "num_latents", "num_heads", "head_dim", "ffn_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"pooler {name} must be a positive integer, got {getattr(self, name)}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"pooler num_layers must be a positive integer or None, got {self.num_layers}")


@strict
class LLMEmbeddingConfig(PreTrainedConfig):
    r"""
    A causal decoder turned into a text embedding model. The paper's five arms are

    | arm | `pooling` | `attention` | what the pooler sees |
    |---|---|---|---|
    | Model 1 | `eos` | `causal` | (no pooler) the last layer's state at the EOS token |
    | Model 2 | `trainable` | `causal` | the last layer's EOS state only |
    | Model 3 | `multi_layer_trainable` | `causal` | the EOS state of every layer |
    | Model 4 | `trainable` | `bidirectional` | every (non-pad) token of the last layer |
    | Model 5 | `multi_layer_trainable` | `bidirectional` | the masked token mean of every layer |

    `mean` (masked mean of the last layer, no pooler) is offered beside them.

    decoder_config (`PreTrainedConfig` or `dict`): config of the causal decoder (Llama, Mistral, Qwen2, ...).
    base_model_name_or_path (`str`, *optional*): where the decoder's pretrained weights came from.
    pooling (`str`): one of `eos`, `mean`, `trainable`, `multi_layer_trainable`.
    attention (`str`): `causal` (the decoder as pretrained) or `bidirectional` (every token sees every token).
    pooler_config (`TrainablePoolerConfig` or `dict`, *optional*): the trainable pooler; its `hidden_size` and,
        for the multi-layer pooler, `num_layers` follow the decoder.
    lora_r (`int`): rank of the LoRA on the decoder; 0 trains no adapter (the decoder stays as it is).
    lora_alpha (`int`), lora_dropout (`float`), lora_target_modules (`list[str]`): the rest of the LoRA
        (the paper: r=16, alpha=32, dropout 0.1 on every projection).
    max_length (`int`): longest input in tokens (EOS included); longer inputs are an error unless truncation
        is asked for.
    """

    model_type = "hfp-llm-embedding"
    sub_configs_defaults = {
        "decoder_config": SubConfigSpec(config_class=AutoConfig, model_type="mistral"),
        "pooler_config": SubConfigSpec(config_class=TrainablePoolerConfig, optional=True),
    }

    decoder_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None
    pooling: str = "multi_layer_trainable"
    attention: str = "bidirectional"
    pooler_config: dict | PreTrainedConfig | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | tuple[str, ...] = ALL_PROJECTIONS
    max_length: int = 1024

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers only warns when a folder of another model is loaded, then builds this one from defaults
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{config_dict['model_type']!r} config given to {cls.__name__} ({cls.model_type!r}): "
                             "load that folder with its own class or an Auto class")
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.pooling in ("trainable", "multi_layer_trainable"):
            pooler = self.pooler_config or TrainablePoolerConfig()
            pooler.hidden_size = self.decoder_config.hidden_size  # an unset latent_dim follows it
            pooler.num_layers = self.decoder_config.num_hidden_layers if self.pooling == "multi_layer_trainable" else None
            self.pooler_config = pooler
        else:
            self.pooler_config = None
        self.lora_target_modules = list(self.lora_target_modules)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The decoder's config: the text model whose vocabulary and embeddings this model uses."""
        return self.decoder_config

    def validate_llm_embedding(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if getattr(self.decoder_config, "is_encoder_decoder", False):
            raise ValueError(f"decoder_config must be a causal decoder; {self.decoder_config.model_type!r} is an "
                             "encoder-decoder")
        if self.lora_r < 0 or self.max_length < 2:
            raise ValueError(f"need lora_r >= 0 and max_length >= 2, got {self.lora_r} and {self.max_length}")


__all__ = ["LLMEmbeddingConfig", "TrainablePoolerConfig"]
