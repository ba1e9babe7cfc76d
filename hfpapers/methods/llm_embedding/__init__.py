"""Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models? (Tang & Yang,
arXiv 2409.02727)."""

from ...registry import MethodRecord, Preset, lazy_exports

_MODULE = "hfpapers.methods.llm_embedding"

# The paper's five arms (Model 1-5), as (pooling, attention).
ARMS = {
    "model-1": {"pooling": "eos", "attention": "causal"},
    "model-2": {"pooling": "trainable", "attention": "causal"},
    "model-3": {"pooling": "multi_layer_trainable", "attention": "causal"},
    "model-4": {"pooling": "trainable", "attention": "bidirectional"},
    "model-5": {"pooling": "multi_layer_trainable", "attention": "bidirectional"},
}
# Mistral-7B-v0.1 (the paper's main base) and Qwen2-0.5B (its robustness check), as their config.json files.
_MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "sliding_window": 4096,
               "tie_word_embeddings": False}
_QWEN2_05B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
# A 4-layer, 64-d Llama over the embedded word vocabulary, with a small pooler: trains on 2 CPU cores.
_TINY = {"decoder_config": {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "max_position_embeddings": 128, "tie_word_embeddings": True},
         "pooler_config": {"num_latents": 16, "num_heads": 4, "head_dim": 32}, "max_length": 64}

_PRESETS = {"tiny": {**_TINY, **ARMS["model-5"]}}
_PRESETS.update({f"tiny-{arm}": {**_TINY, **values} for arm, values in ARMS.items()})
_PRESETS.update({f"mistral-7b-{arm}": {"decoder_config": _MISTRAL_7B, **values} for arm, values in ARMS.items()})
_PRESETS.update({f"qwen2-0.5b-{arm}": {"decoder_config": _QWEN2_05B, **values} for arm, values in ARMS.items()})

# The paper's optimiser (per-device batch 1 x accumulation 256 x 8 GPUs = 2,048; 1,000 steps, bf16).
_PAPER_TRAINING = {"learning_rate": 1e-5, "weight_decay": 0.01, "lr_scheduler": "linear", "warmup_steps": 100,
                   "per_device_train_batch_size": 1, "gradient_accumulation_steps": 256, "num_epochs": 1,
                   "mixed_precision": "bf16"}
# CPU-sized training for the tiny presets: a fresh decoder warmed up on the embedded texts, then a few epochs.
_TINY_TRAINING = {**_PAPER_TRAINING, "learning_rate": 2e-3, "warmup_steps": 10, "per_device_train_batch_size": 32,
                  "gradient_accumulation_steps": 1, "num_epochs": 3, "mixed_precision": "no", "pretrain_epochs": 4}

RECORD = MethodRecord(
    slug="llm-embedding",
    title="Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?",
    arxiv_id="2409.02727",
    authors="Yixuan Tang, Yi Yang",
    year=2024,
    task="sentence-embedding",
    config_class=f"{_MODULE}.configuration_llm_embedding.LLMEmbeddingConfig",
    model_classes={"AutoModel": f"{_MODULE}.modeling_llm_embedding.LLMEmbeddingModel"},
    processor=f"{_MODULE}.recipe.load_tokenizer",
    pipeline_class=f"{_MODULE}.pipeline_llm_embedding.SentenceEmbeddingPipeline",
    presets={name: Preset(values, _TINY_TRAINING if name.startswith("tiny") else _PAPER_TRAINING)
             for name, values in _PRESETS.items()},
    default_preset="tiny",
    paper_presets=tuple(f"mistral-7b-{arm}" for arm in ARMS),
    dataset="triplets",
    dataset_kwargs={"num_train": 2048, "num_test": 256},
    recipe=f"{_MODULE}.recipe.LLMEmbeddingRecipe",
    converter=f"{_MODULE}.convert_llm_embedding",
    official_code="https://github.com/yixuantt/PoolingAndAttn",
    license="unknown",  # the official repository has no licence file
    weights_license="Apache-2.0 (Mistral-7B-v0.1 base); the trained adapters are shared without a licence",
    bibtex="""@article{tang2024pooling,
  title   = {Pooling And Attention: What Are Effective Designs For {LLM}-Based Embedding Models?},
  author  = {Tang, Yixuan and Yang, Yi},
  journal = {arXiv preprint arXiv:2409.02727},
  year    = {2024}
}""",
    time_budget_s=60,
    paper_results={
        "Model 1 (EOS, causal), Mistral-7B, MTEB STS / Class. / Retr. / Clus.": "0.8302 / 0.7244 / 0.5394 / 0.4503",
        "Model 5 (multi-layer trainable, bidirectional), delta vs Model 1": "+0.0166* / -0.0143* / +0.0226* / -0.0246*",
        "Model 2 / 3 / 4, STS delta vs Model 1": "+0.0129* / +0.0118* / +0.0095*",
    },
)


# Exports load lazily: the record above must stay importable without torch.
__getattr__ = lazy_exports(__name__, {
    "configuration_llm_embedding": ("LLMEmbeddingConfig", "TrainablePoolerConfig",),
    "modeling_llm_embedding": ("LLMEmbeddingModel", "LLMEmbeddingOutput", "LLMEmbeddingPreTrainedModel",
                               "TrainablePooler", "pad_left", "tokenize",),
    "pipeline_llm_embedding": ("SentenceEmbeddingPipeline",),
})
