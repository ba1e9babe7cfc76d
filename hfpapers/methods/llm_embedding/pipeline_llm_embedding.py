"""`pipeline("sentence-embedding", model=...)`: texts -> L2-normalised embedding vectors.

Texts go through `tokenize` (EOS appended, left padding, the model's max_length) rather than a bare tokenizer
call, so the vector is read where the model was trained to put it. `instruction` is prepended to every text
without a separator, as the official evaluation does with its E5-style task instructions.
"""

from typing import Any

from transformers import Pipeline

from .modeling_llm_embedding import tokenize


class SentenceEmbeddingPipeline(Pipeline):
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, truncation=None, instruction=None, return_tensors=None, **kwargs):
        preprocess = {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if instruction is not None:
            preprocess["instruction"] = instruction
        postprocess = {"return_tensors": return_tensors} if return_tensors is not None else {}
        return preprocess, {}, postprocess

    def preprocess(self, text: str, truncation: bool = False, instruction: str = ""):
        if not isinstance(text, str):
            raise TypeError(f"sentence-embedding takes strings, got {type(text).__name__}")
        return tokenize(self.tokenizer, [instruction + text], self.model.config.max_length, truncation)

    def _forward(self, model_inputs):
        return self.model(**model_inputs).embeddings

    def postprocess(self, embeddings, return_tensors: bool = False):
        return embeddings[0] if return_tensors else embeddings[0].tolist()

    def __call__(self, inputs: str | list[str], **kwargs: Any):
        """One vector (a list of floats, or a tensor with `return_tensors=True`) per text. A text over the model's
        `max_length` tokens is an error unless `truncation=True` (then its first max_length - 1 tokens + EOS)."""
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise ValueError("sentence-embedding got an empty list of texts; pass at least one string")
        return super().__call__(inputs, **kwargs)


__all__ = ["SentenceEmbeddingPipeline"]
