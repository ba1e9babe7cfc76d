"""LLM-based embedding models of "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding
Models?" (Tang & Yang, arXiv 2409.02727): any causal decoder, causal or bidirectional attention, EOS / mean /
trainable / multi-layer trainable pooling, LoRA on the decoder.

The trainable pooler follows the official `PerceiverResampler`: learned latents query the LLM states. Unlike the
official code, pad tokens are masked out of the pooler's keys (its Model 4 attends to them).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_llm_embedding import LLMEmbeddingConfig, TrainablePoolerConfig

# What `save_pretrained` adds for embedding users' tools: the sentence-transformers module (a file shipped beside
# this one) and the folder of the decoder's LoRA as a standard peft adapter.
SENTENCE_TRANSFORMERS_MODULE = "sentence_transformers_llm_embedding.LLMEmbeddingTransformer"
ADAPTER_FOLDER = "adapter"


@dataclass
class LLMEmbeddingOutput(ModelOutput):
    """
    embeddings (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`): L2-normalised text embeddings.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): decoder output.
    pooler_inputs (`torch.FloatTensor` of shape `(batch_size, n, hidden_size)`): what the pooling saw (the EOS
        state, every token, or one vector per layer).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): the decoder's embedding output and every layer's
        output, (batch_size, sequence_length, hidden_size) each, with `output_hidden_states=True`.
    attentions (`tuple(torch.FloatTensor)`, *optional*): the decoder's attention weights per layer, with
        `output_attentions=True` (eager attention).
    """

    embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_inputs: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class PoolerCrossAttention(nn.Module):
    """Pre-norm cross-attention: latents (batch, num_latents, latent_dim) are the queries, the LLM states
    (batch, n, hidden_size) the keys and values; no biases, scaled dot product over `num_heads` heads."""

    def __init__(self, config: TrainablePoolerConfig):
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.config = config
        self.is_causal = False  # latents attend to every (non-pad) state
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
        # The decoder's switch (`attn_implementation`) picks this one too: "sdpa" by default, "eager" to read weights.
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation or "sdpa",
                                                          eager_attention_forward)
        out, _ = attention(self, q, k, v, attn_mask, dropout=0.0, scaling=q.shape[-1] ** -0.5)
        return self.to_out(out.flatten(2))


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out: (batch, heads, n, dim) each, a boolean key mask -> the output
    (batch, n, heads, dim) and the weights (batch, heads, n_query, n_key)."""
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


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


def _init_lora(model: nn.Module) -> None:
    """peft's LoRA init (A Kaiming-uniform, B = 0: the adapter starts as the identity) for every LoRA layer. The
    decoder's own `_init_weights` would draw B like any Linear; `init.*` skips weights loaded from a checkpoint."""
    for module in model.modules():
        if isinstance(getattr(module, "lora_B", None), nn.ModuleDict):
            for name in module.lora_B:
                init.kaiming_uniform_(module.lora_A[name].weight, a=math.sqrt(5))
                init.zeros_(module.lora_B[name].weight)


class LLMEmbeddingPreTrainedModel(PreTrainedModel):
    config_class = LLMEmbeddingConfig
    base_model_prefix = "embedder"
    main_input_name = "input_ids"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # The official code keeps its pooler in float32 under a bf16 decoder, and peft its LoRA weights.
    _keep_in_fp32_modules_strict = ["pooler", "lora_A", "lora_B"]

    @classmethod
    def is_custom_code(cls) -> bool:
        # Our inits go through `transformers.initialization` only, so the per-weight "loaded" flags are exact; the
        # guard transformers keeps for custom code would skip modules without weights of their own.
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        # The official pooler keeps PyTorch's default inits, with `randn` latents. Sub-modules come first, so the
        # wrapper itself (last) restores peft's LoRA init after the decoder's init has run over the LoRA layers.
        if isinstance(module, LLMEmbeddingModel):
            _init_lora(module.decoder)
        elif isinstance(module, TrainablePooler):
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
        if self.pooler is not None:
            self.pooler.float()  # _keep_in_fp32_modules_strict, also when built under another default dtype
        self.post_init()
        if config.lora_r:
            # After post_init, so that LoRA keeps peft's init (B = 0) and freezes the decoder's own weights.
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(
                LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(config.lora_target_modules)), self.decoder)
            for name, module in self.decoder.named_modules():  # peft casts inputs to the LoRA dtype and back
                if name.endswith(("lora_A", "lora_B")):
                    module.float()
            # A fresh model keeps peft's init through any later initialize_weights() (loading re-inits).
            if getattr(self, "_is_hf_initialized", False):
                for module in self.decoder.modules():
                    module._is_hf_initialized = True

    @classmethod
    def from_decoder(cls, base_model_name_or_path: str, **config_kwargs) -> LLMEmbeddingModel:
        """Wrap a pretrained decoder (Hub id or local folder) in a fresh embedding head and LoRA."""
        decoder = AutoModel.from_pretrained(base_model_name_or_path, dtype="auto")  # the checkpoint's dtype
        config = LLMEmbeddingConfig(decoder_config=decoder.config.to_dict(),
                                    base_model_name_or_path=str(base_model_name_or_path), **config_kwargs)
        return cls(config, decoder=decoder)

    def save_pretrained(self, save_directory, is_main_process: bool = True, *, push_to_hub: bool = False,
                        **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus what embedding tools load: the files of a one-module
        sentence-transformers model (`SentenceTransformer(folder, trust_remote_code=True)`) and, with LoRA, the
        decoder's adapter in peft's format in `adapter/` (`PeftModel.from_pretrained(decoder, folder,
        subfolder="adapter")`)."""
        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
        super().save_pretrained(save_directory, is_main_process, **kwargs)
        if self.should_save_on_this_rank(is_main_process):
            self._save_sentence_transformers_files(Path(save_directory))
            if self.config.lora_r:
                self.save_adapter(Path(save_directory, ADAPTER_FOLDER))
        if push_to_hub:  # after the extra files: push_to_hub saves (through this method) and uploads the whole
            self.push_to_hub(hub.pop("repo_id", Path(save_directory).name), token=kwargs.get("token"), **hub)

    def _save_sentence_transformers_files(self, folder: Path) -> None:
        code = Path(__file__).with_name(SENTENCE_TRANSFORMERS_MODULE.partition(".")[0] + ".py")
        if not code.is_file():  # this file runs as remote code that was fetched without the module
            return
        shutil.copyfile(code, folder / code.name)
        files = {
            "modules.json": [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_MODULE}],
            # The model pools and normalises by itself: its `embeddings` are the sentence embedding.
            "sentence_bert_config.json": {
                "transformer_task": "feature-extraction", "module_output_name": "sentence_embedding",
                "modality_config": {"text": {"method": "forward", "method_output_name": "embeddings"}}},
            "config_sentence_transformers.json": {"model_type": "SentenceTransformer", "prompts": {},
                                                  "default_prompt_name": None, "similarity_fn_name": "cosine"},
        }
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content, indent=2) + "\n")

    def save_adapter(self, save_directory) -> None:
        """The decoder's LoRA as a standard peft adapter folder (`adapter_config.json` +
        `adapter_model.safetensors`, keys as `PeftModel.save_pretrained` writes them for the bare decoder, as the
        official release): `PeftModel.from_pretrained(AutoModel.from_pretrained(base), save_directory)` gives this
        model's decoder (its LoRA; bidirectional attention and the pooling are not part of an adapter)."""
        if not self.config.lora_r:
            raise ValueError("this model has no LoRA (lora_r=0): there is no adapter to save")
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter_config = self.decoder.peft_config["default"]
        adapter_config.base_model_name_or_path = self.config.base_model_name_or_path
        state = get_peft_model_state_dict(self.decoder)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        adapter_config.save_pretrained(save_directory)
        save_file({f"base_model.model.{key}": value.detach().contiguous() for key, value in state.items()},
                  str(Path(save_directory, "adapter_model.safetensors")), metadata={"format": "pt"})

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def _check_inputs(self, input_ids, attention_mask, inputs_embeds) -> tuple[int, int]:
        """(batch, sequence) of the inputs, or one clear error for what does not fit."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (batch, sequence) or inputs_embeds "
                             "(batch, sequence, hidden_size)")
        if input_ids is not None:
            if input_ids.ndim != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be integer token ids (batch, sequence), got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}")
            vocab = self.get_input_embeddings().num_embeddings
            checked = input_ids.numel() and not torch.compiler.is_compiling()  # a trace skips this data-dependent check
            if checked and (input_ids.min() < 0 or input_ids.max() >= vocab):
                raise ValueError(f"token ids must lie in [0, {vocab}), got {int(input_ids.min())}.."
                                 f"{int(input_ids.max())}")
            shape = tuple(input_ids.shape)
        else:
            hidden = self.config.decoder_config.hidden_size
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden or not inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be float (batch, sequence, {hidden}), got "
                                 f"{inputs_embeds.dtype} {tuple(inputs_embeds.shape)}")
            if not torch.compiler.is_compiling() and not torch.isfinite(inputs_embeds).all():
                raise ValueError("inputs_embeds contain NaN or inf")
            shape = tuple(inputs_embeds.shape[:2])
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"empty batch: got inputs of shape {shape}; pass at least one text of one token")
        positions = getattr(self.config.decoder_config, "max_position_embeddings", None) or self.config.max_length
        if shape[1] > min(self.config.max_length, positions):
            raise ValueError(f"inputs of shape (batch, sequence) = {shape}: the sequence length {shape[1]} is over "
                             f"max_length={self.config.max_length} (the decoder has {positions} positions); "
                             "tokenize with truncation=True to cut longer texts")
        if attention_mask is not None and tuple(attention_mask.shape) != shape:
            raise ValueError(f"attention_mask must have the inputs' shape {shape}, got {tuple(attention_mask.shape)}")
        return shape

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.FloatTensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> LLMEmbeddingOutput | tuple:
        """`input_ids` (batch, sequence) left-padded, ending in EOS, or `inputs_embeds` (batch, sequence, hidden);
        `attention_mask` (batch, sequence), 1 for real tokens. `output_hidden_states` / `output_attentions` return
        the decoder's; `return_dict=False` returns the output's non-None fields as a tuple."""
        self._check_inputs(input_ids, attention_mask, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if not torch.compiler.is_compiling():  # data-dependent: a torch.compile trace skips them (no graph break)
            if (attention_mask.sum(-1) == 0).any():
                raise ValueError("every row needs at least one real token (attention_mask all zero in some row)")
            if attention_mask.shape[1] > 1 and (attention_mask[:, -1] == 0).any():
                raise ValueError("inputs must be left-padded: the last position of every row is its EOS token")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = attention_mask
        if self.config.attention == "bidirectional":
            # Always a full mask: an unpadded batch would otherwise get none, and the decoder would build its
            # causal one (eager attention follows the mask alone).
            mask = create_bidirectional_mask(self.decoder.config, inputs_embeds, attention_mask,
                                             allow_is_bidirectional_skip=False)
        multi_layer = self.config.pooling == "multi_layer_trainable"
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                           output_hidden_states=multi_layer or output_hidden_states,
                           output_attentions=output_attentions, use_cache=False, **kwargs)
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
            # The pooler may be float32 under a bf16 decoder (`_keep_in_fp32_modules_strict`).
            embeddings = self.pooler(pooler_inputs.to(self.pooler.latents.dtype),
                                     attention_mask if every_token else None)
        output = LLMEmbeddingOutput(embeddings=embeddings, last_hidden_state=states, pooler_inputs=pooler_inputs,
                                    hidden_states=out.hidden_states if output_hidden_states else None,
                                    attentions=out.attentions if output_attentions else None)
        return output if return_dict else output.to_tuple()

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
