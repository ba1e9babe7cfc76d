"""The sentence-transformers module of the embedding models: `SentenceTransformer(folder, trust_remote_code=True)`.

`LLMEmbeddingModel.save_pretrained` ships this file with `modules.json`, so the folder loads where hfpapers is not
installed. The model pools and L2-normalises by itself, so this one module is the whole SentenceTransformer (no
Pooling, no Normalize): sentence-transformers' `Transformer` on the model's `embeddings` output, tokenising through
`tokenize` (EOS appended where the tokenizer does not add it, left padding), so that the vectors are the
`sentence-embedding` pipeline's. As sentence-transformers does for every model, texts over the maximum length are
cut (here to max_length - 1 tokens + EOS) instead of refused.
"""

from sentence_transformers.base.modules import Transformer

from .modeling_llm_embedding import tokenize


class LLMEmbeddingTransformer(Transformer):
    def preprocess(self, inputs, prompt: str | None = None, max_length: int | None = None, **kwargs) -> dict:
        if not inputs:
            return {}
        if not all(isinstance(text, str) for text in inputs):
            raise TypeError(f"{type(self.model).__name__} embeds texts only; got "
                            f"{sorted({type(text).__name__ for text in inputs})}")
        # The shortest of the model's own limit, a caller's max_length and `max_seq_length` (the tokenizer's).
        limits = [self.model.config.max_length, max_length, self.max_seq_length]
        features = tokenize(self.tokenizer, [(prompt or "") + text for text in inputs],
                            min(limit for limit in limits if limit), truncation=True)
        return {**features, "modality": "text"}

    def get_embedding_dimension(self) -> int:
        config = self.model.config  # the pooler's latents, or the decoder's states
        pooler = config.pooler_config
        return pooler.latent_size if pooler is not None else config.decoder_config.hidden_size


__all__ = ["LLMEmbeddingTransformer"]
