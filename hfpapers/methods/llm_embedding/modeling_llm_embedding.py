"""LLM-based embedding models of "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding
Models?" (Tang & Yang, arXiv 2409.02727): any causal decoder, causal or bidirectional attention, EOS / mean /
trainable / multi-layer trainable pooling, LoRA on the decoder.

The trainable pooler follows the official `PerceiverResampler`: learned latents query the LLM states. Unlike the
official code, pad tokens are masked out of the pooler's keys (its Model 4 attends to them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput

from .configuration_llm_embedding import LLMEmbeddingConfig, TrainablePoolerConfig


@dataclass
class LLMEmbeddingOutput(ModelOutput):
    """
    embeddings (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`): L2-normalised text embeddings.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): decoder output.
    pooler_inputs (`torch.FloatTensor` of shape `(batch_size, n, hidden_size)`): what the pooling saw (the EOS
        state, every token, or one vector per layer).
    """

    embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_inputs: torch.FloatTensor | None = None


class PoolerCrossAttention(nn.Module):
    """Pre-norm cross-attention: latents (batch, num_latents, latent_dim) are the queries, the LLM states
    (batch, n, hidden_size) the keys and values; no biases, scaled dot product over `num_heads` heads."""

    def __init__(self, config: TrainablePoolerConfig):
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.num_heads = config.num_heads
        self.norm_states = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm_latents = nn.LayerNorm(config.latent_size, eps=config.layer_norm_eps)
        self.to_q = nn.Linear(config.latent_size, inner, bias=False)
        self.to_kv = nn.Linear(config.hidden_size, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, config.latent_size, bias=False)

    def forward(self, latents: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def heads(t):  # (batch, n, heads * dim) -> (batch, heads, n, dim)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q = heads(self.to_q(self.norm_latents(latents)))
        k, v = map(heads, self.to_kv(self.norm_states(states)).chunk(2, dim=-1))
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # keys only: pads are never attended
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLUFeedForward(nn.Module):
    """Pre-norm `Linear(d, 2 m d) -> x * gelu(gate) -> Linear(m d, d)` (with biases, as in the official code)."""

    def __init__(self, config: TrainablePoolerConfig):
        super().__init__()
        inner = config.ffn_mult * config.latent_size
        self.norm = nn.LayerNorm(config.latent_size, eps=config.layer_norm_eps)
        self.proj_in = nn.Linear(config.latent_size, 2 * inner)
        self.proj_out = nn.Linear(inner, config.latent_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(x * F.gelu(gate))


class TrainablePooler(nn.Module):
    """States (batch, n, hidden_size) -> L2-normalised embedding (batch, latent_dim).

    With `config.num_layers` set it is the multi-layer pooler: n must equal num_layers, and the learned layer
    embedding is added to the per-layer vectors before the cross-attention.
    """

    def __init__(self, config: TrainablePoolerConfig):
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.empty(config.num_latents, config.latent_size))
        self.layer_embedding = nn.Embedding(config.num_layers, config.hidden_size) if config.num_layers else None
        self.cross_attention = PoolerCrossAttention(config)
        self.feed_forward = GEGLUFeedForward(config)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if states.shape[-1] != self.config.hidden_size:
            raise ValueError(f"the pooler expects states of size {self.config.hidden_size}, got {states.shape[-1]}")
        if self.layer_embedding is not None:
            if states.shape[1] != self.config.num_layers:
                raise ValueError(f"the multi-layer pooler expects one vector per layer ({self.config.num_layers}), "
                                 f"got {states.shape[1]}")
            states = states + self.layer_embedding.weight
        latents = self.latents.expand(states.shape[0], -1, -1)
        latents = latents + self.cross_attention(latents, states, mask)
        latents = latents + self.feed_forward(latents)
        return F.normalize(latents.mean(dim=1), p=2, dim=-1)


def _attention_modules(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's self-attention modules: the ones that carry transformers' `is_causal` flag."""
    return [m for m in decoder.modules() if hasattr(m, "is_causal") and hasattr(m, "config")]


class LLMEmbeddingPreTrainedModel(PreTrainedModel):
    config_class = LLMEmbeddingConfig
    base_model_prefix = "embedder"
    main_input_name = "input_ids"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # The official pooler keeps PyTorch's default inits, with `randn` latents.
        if isinstance(module, TrainablePooler):
            init.normal_(module.latents, mean=0.0, std=1.0)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)


class LLMEmbeddingModel(LLMEmbeddingPreTrainedModel):
    """A causal decoder + pooling -> one L2-normalised vector per text.

    Inputs are left-padded token ids ending in EOS (see `tokenize`); `attention_mask` marks the real tokens.
    Position ids are counted over real tokens only, so a left-padded row embeds exactly like the same text alone.
    """

    def __init__(self, config: LLMEmbeddingConfig, decoder: PreTrainedModel | None = None):
        super().__init__(config)
        self.decoder = decoder if decoder is not None else AutoModel.from_config(config.decoder_config)
        attentions = _attention_modules(self.decoder)
        if not attentions or not all(m.is_causal for m in attentions):
            raise ValueError(f"{type(self.decoder).__name__} is not a causal decoder (its self-attention is not "
                             "causal); the paper's embedding models start from a decoder-only LLM")
        if config.attention == "bidirectional":
            for module in attentions:  # the transformers 5 route: SDPA/eager then follow the mask alone
                module.is_causal = False
        self.pooler = TrainablePooler(config.pooler_config) if config.pooler_config is not None else None
        self.post_init()
        if config.lora_r:
            # After post_init, so that LoRA keeps peft's init (B = 0) and freezes the decoder's own weights.
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(
                LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(config.lora_target_modules)), self.decoder)

    @classmethod
    def from_decoder(cls, base_model_name_or_path: str, **config_kwargs) -> LLMEmbeddingModel:
        """Wrap a pretrained decoder (Hub id or local folder) in a fresh embedding head and LoRA."""
        decoder = AutoModel.from_pretrained(base_model_name_or_path)
        config = LLMEmbeddingConfig(decoder_config=decoder.config.to_dict(),
                                    base_model_name_or_path=str(base_model_name_or_path), **config_kwargs)
        return cls(config, decoder=decoder)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> LLMEmbeddingOutput:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"input_ids must be (batch, sequence) with sequence <= max_length="
                             f"{self.config.max_length}, got {tuple(input_ids.shape)}; tokenize with "
                             "truncation=True to cut longer texts")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask.sum(-1) == 0).any():
            raise ValueError("every row needs at least one real token (attention_mask all zero in some row)")
        if attention_mask.shape[1] > 1 and (attention_mask[:, -1] == 0).any():
            raise ValueError("inputs must be left-padded: the last position of every row is its EOS token")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs_embeds = self.decoder.get_input_embeddings()(input_ids)
        mask = attention_mask
        if self.config.attention == "bidirectional":
            mask = create_bidirectional_mask(self.decoder.config, inputs_embeds, attention_mask)
        multi_layer = self.config.pooling == "multi_layer_trainable"
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                           output_hidden_states=multi_layer, use_cache=False, **kwargs)
        states = out.last_hidden_state
        pool_mask = attention_mask.to(states.dtype)
        causal = self.config.attention == "causal"
        # What each arm feeds its pooling (left padding puts every EOS at the last position).
        if self.config.pooling == "eos":
            pooler_inputs = states[:, -1:]
        elif self.config.pooling == "mean":
            pooler_inputs = _masked_mean(states, pool_mask)[:, None]
        elif self.config.pooling == "trainable":
            pooler_inputs = states[:, -1:] if causal else states
        else:  # hidden_states[1:]: every layer's output, the embedding output left out (as the official code)
            layers = out.hidden_states[1:]
            pooler_inputs = torch.stack([h[:, -1] if causal else _masked_mean(h, pool_mask) for h in layers], 1)
        if self.pooler is None:
            embeddings = F.normalize(pooler_inputs[:, 0], p=2, dim=-1)
        else:
            every_token = self.config.pooling == "trainable" and not causal
            embeddings = self.pooler(pooler_inputs, attention_mask if every_token else None)
        return LLMEmbeddingOutput(embeddings=embeddings, last_hidden_state=states, pooler_inputs=pooler_inputs)

    @torch.no_grad()
    def encode(self, texts: list[str], tokenizer, batch_size: int = 64, instruction: str = "",
               truncation: bool = False) -> torch.Tensor:
        """Embeddings (len(texts), dim) of `texts`, in batches; `instruction` is prepended without a separator
        (as the official evaluation prepends its task instructions)."""
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        was_training = self.training
        self.eval()
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, [instruction + t for t in texts[start:start + batch_size]],
                             self.config.max_length, truncation)
            chunks.append(self(**{k: v.to(self.device) for k, v in batch.items()}).embeddings.float().cpu())
        self.train(was_training)
        return torch.cat(chunks)


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: states (batch, seq, hidden), mask (batch, seq) -> (batch, hidden)."""
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def tokenize(tokenizer, texts: list[str], max_length: int, truncation: bool = False) -> dict[str, torch.Tensor]:
    """Texts -> left-padded `input_ids` / `attention_mask`, every row ending in EOS (the official tokenizers'
    `add_eos_token=True`; EOS is appended where the tokenizer does not add it). Empty texts and, unless
    `truncation`, texts over `max_length` tokens are errors."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("empty text: every input needs at least one non-blank character")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; the embedding is read at the EOS position")
    rows = [row if row and row[-1] == eos else row + [eos] for row in tokenizer(list(texts))["input_ids"]]
    for i, row in enumerate(rows):
        if len(row) > max_length:
            if not truncation:
                raise ValueError(f"text {i} has {len(row)} tokens with EOS, over max_length={max_length}; "
                                 "pass truncation=True to cut it")
            rows[i] = row[: max_length - 1] + [eos]
    return pad_left(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)


def pad_left(rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token id rows -> left-padded `input_ids` and `attention_mask` (batch, longest row)."""
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad_token_id] * (width - len(r)) + list(r) for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


__all__ = ["LLMEmbeddingModel", "LLMEmbeddingOutput", "LLMEmbeddingPreTrainedModel", "TrainablePooler", "pad_left",
           "tokenize"]
