"""The contrastive training recipe of "Pooling And Attention" (paper §3 and the official `model*_trainer.py`).

InfoNCE over cosine similarities at temperature 0.05 (the official `HardNegativeNLLLoss`, scale 20): every query
against all positives and hard negatives of the batch, gathered from every process *with* gradient. LoRA r=16,
alpha=32, dropout 0.1 on every projection of the decoder, the pooler fully trained; AdamW at lr 1e-5, weight
decay 0.01, linear decay after 100 warm-up steps, 2,048 texts per optimiser step.

Beyond the paper, `gradient_cache=True` makes the contrastive batch the whole per-process batch at any memory:
embeddings are first computed without a graph, the loss's gradient with respect to them is cached, then each
chunk is re-run with a graph and back-propagated with that cached gradient (Gao et al., 2021). The official
code accumulates gradients over 256 micro-batches instead, so each of its softmaxes sees only 8 queries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...data.text import build_word_tokenizer
from ...engine import Recipe, warm_start
from .configuration_llm_embedding import LLMEmbeddingConfig
from .modeling_llm_embedding import LLMEmbeddingModel, pad_left, tokenize

TEXT_FIELDS = ("query", "positive", "negative")


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (batch, dim) from every process, rank order, keeping the autograd graph: the
    backward sums every process's gradient into the owner's slice (as the official `AllGather`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             temperature: float = 0.05) -> torch.Tensor:
    """Mean cross-entropy of query i picking candidate i among [positives ++ negatives], scored by cosine
    similarity / temperature; inputs (n, dim), gathered across processes by the caller."""
    candidates = F.normalize(torch.cat([positives, negatives]), dim=-1)
    scores = F.normalize(queries, dim=-1) @ candidates.T / temperature
    return F.cross_entropy(scores, torch.arange(len(queries), device=scores.device))


def load_tokenizer(config: LLMEmbeddingConfig):
    """The base decoder's tokenizer, padding on the left; the embedded word-level one for a fresh decoder."""
    if config.base_model_name_or_path is None:
        tokenizer = build_word_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)
    if tokenizer.pad_token is None:  # the official trainers pad with unk, else eos
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = config.max_length
    if len(tokenizer) > config.decoder_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the decoder's vocab_size is "
                         f"{config.decoder_config.vocab_size}")
    return tokenizer


class TokenizedTexts(torch.utils.data.Dataset):
    """Rows of named token-id lists (ragged); `collate_texts` left-pads each name."""

    def __init__(self, **rows: list[list[int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {name: rows[index] for name, rows in self.rows.items()}


def collate_texts(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, dict[str, torch.Tensor]]:
    return {name: pad_left([e[name] for e in examples], pad_token_id) for name in examples[0]}


def _token_rows(tokenizer, texts, max_length: int, truncation: bool) -> list[list[int]]:
    batch = tokenize(tokenizer, list(texts), max_length, truncation)
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


# The training arguments of that warm start.
_DECODER_TRAINING = {"learning_rate": 3e-3, "weight_decay": 0.01, "lr_scheduler": "cosine", "warmup_steps": 20,
                     "per_device_train_batch_size": 64, "num_epochs": 2}


@dataclass
class CausalLMRecipe(Recipe):
    """Next-token prediction on the embedded texts: the warm start of a fresh tiny decoder, standing in for the
    LLM pre-training that the paper's Mistral-7B had. The loss ignores pad positions."""

    max_length: int = 64
    columns = TEXT_FIELDS
    metric = "loss"

    def prepare_dataset(self, dataset, processor) -> TokenizedTexts:
        texts = [t for field in TEXT_FIELDS for t in dataset[field]]
        self.pad_token_id = processor.pad_token_id
        return TokenizedTexts(text=_token_rows(processor, texts, self.max_length, truncation=True))

    def collate(self, examples):
        return collate_texts(examples, self.pad_token_id)["text"]

    def compute_loss(self, model, batch, step_rng, state):
        return self._loss(model, batch).mean()

    def _loss(self, model, batch) -> torch.Tensor:
        """Per-sequence mean token loss (batch,)."""
        mask = batch["attention_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1].float()
        targets, target_mask = batch["input_ids"][:, 1:], mask[:, 1:].float()
        tokens = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * target_mask
        return tokens.sum(-1) / target_mask.sum(-1).clamp(min=1)

    def eval_outputs(self, model, batch):
        return {"loss": self._loss(model, batch)}

    def compute_metrics(self, outputs):
        return {"loss": outputs["loss"].mean().item()}


def pretrain_decoder(decoder_config, tokenizer, datasets, output_dir: str, seed: int, **settings) -> str:
    """Train a fresh causal LM of `decoder_config` on the embedded texts (through the engine) into
    `output_dir`; reused when it is already there. Returns the folder."""
    from transformers import AutoModelForCausalLM

    return str(warm_start(output_dir, lambda: AutoModelForCausalLM.from_config(decoder_config), datasets,
                          CausalLMRecipe(), seed=seed, processor=tokenizer, **{**_DECODER_TRAINING, **settings}))


@dataclass
class LLMEmbeddingRecipe(Recipe):
    temperature: float = 0.05  # the official scale 20
    base_model: str | None = None  # decoder Hub id or folder; None: a fresh decoder with the word tokenizer
    pretrain_epochs: int = 0  # next-token warm start of a fresh decoder on the embedded texts (no base_model)
    gradient_cache: bool = False
    cache_chunk_size: int = 16  # texts per forward with a graph, under gradient_cache
    truncation: bool = False  # cut texts over the config's max_length instead of failing

    metric = "accuracy"
    columns = TEXT_FIELDS
    processor_class = "AutoTokenizer"

    def build_model(self, preset, datasets, args):
        values = dict(preset.values)
        if self.base_model is not None:
            values.pop("decoder_config", None)
            model = LLMEmbeddingModel.from_decoder(self.base_model, **values)
            return model, load_tokenizer(model.config)
        config = LLMEmbeddingConfig(**values)
        tokenizer = load_tokenizer(config)
        if not self.pretrain_epochs:
            return LLMEmbeddingModel(config), tokenizer
        base = pretrain_decoder(config.decoder_config, tokenizer, datasets, str(Path(args.output_dir, "base-decoder")),
                                args.seed, num_epochs=self.pretrain_epochs)
        tokenizer.save_pretrained(base)
        values.pop("decoder_config")
        return LLMEmbeddingModel.from_decoder(base, **values), tokenizer

    def build_optimizer(self, model, args):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                 weight_decay=args.weight_decay)

    def prepare_dataset(self, dataset, processor) -> TokenizedTexts:
        self.pad_token_id = processor.pad_token_id
        # build_model sets the tokenizer's model_max_length to the config's max_length (saved with it).
        return TokenizedTexts(**{field: _token_rows(processor, dataset[field], processor.model_max_length,
                                                    self.truncation) for field in TEXT_FIELDS})

    def collate(self, examples):
        return collate_texts(examples, self.pad_token_id)

    def compute_loss(self, model, batch, step_rng, state):
        q, p, n = (gather_with_grad(model(**batch[field]).embeddings) for field in TEXT_FIELDS)
        return info_nce(q, p, n, self.temperature)

    def backward(self, accelerator, model, batch, step_rng, state):
        if not self.gradient_cache:
            return super().backward(accelerator, model, batch, step_rng, state)
        chunks = [(field, {k: v[i:i + self.cache_chunk_size] for k, v in batch[field].items()})
                  for field in TEXT_FIELDS for i in range(0, len(batch[field]["input_ids"]), self.cache_chunk_size)]
        # 1) every embedding without a graph, remembering the RNG so that dropout repeats in step 3
        states, outputs = [], {field: [] for field in TEXT_FIELDS}
        with torch.no_grad():
            for field, chunk in chunks:
                states.append(torch.get_rng_state())
                outputs[field].append(model(**chunk).embeddings)
        reps = {field: torch.cat(outputs[field]).requires_grad_() for field in TEXT_FIELDS}
        # 2) the loss over the whole batch (gathered across processes) and its gradient for each embedding
        loss = info_nce(*(gather_with_grad(reps[field]) for field in TEXT_FIELDS), self.temperature)
        loss.backward()
        offsets = {field: 0 for field in TEXT_FIELDS}
        # 3) each chunk again with a graph, back-propagating the cached gradient; gradients sync on the last
        for i, ((field, chunk), state) in enumerate(zip(chunks, states)):
            size = len(chunk["input_ids"])
            cached = reps[field].grad[offsets[field]:offsets[field] + size]
            offsets[field] += size
            last = i == len(chunks) - 1 and accelerator.sync_gradients
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                torch.set_rng_state(state)
                accelerator.backward((model(**chunk).embeddings * cached).sum())
        return loss.detach()

    def eval_outputs(self, model, batch):
        return {field: model(**batch[field]).embeddings for field in TEXT_FIELDS}

    def compute_metrics(self, outputs):
        """Triplet accuracy (the query is closer to its positive than to its hard negative, as
        sentence-transformers' TripletEvaluator) and the InfoNCE loss over the whole test set. (Retrieval
        among all test passages would count paraphrases of the same fact, which the set repeats, as misses.)"""
        q, p, n = (outputs[field].float() for field in TEXT_FIELDS)
        accuracy = ((q * p).sum(-1) > (q * n).sum(-1)).float().mean().item()
        return {"accuracy": accuracy, "loss": info_nce(q, p, n, self.temperature).item()}
