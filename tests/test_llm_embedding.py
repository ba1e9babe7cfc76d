"""LLM-based embedding models: what each arm feeds its pooling, the pooler against a loop, bidirectional attention,
padding, the contrastive loss across processes, the gradient cache, saving and the pipeline."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

import hfpapers
from conftest import REPO, read_json
from hfpapers.engine import TrainingState
from hfpapers.methods.llm_embedding import ARMS
from hfpapers.methods.llm_embedding.configuration_llm_embedding import LLMEmbeddingConfig, TrainablePoolerConfig
from hfpapers.methods.llm_embedding.modeling_llm_embedding import LLMEmbeddingModel, TrainablePooler, tokenize
from hfpapers.methods.llm_embedding.recipe import gather_with_grad, info_nce

FAMILIES = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "sliding_window": None},
    "qwen2": {"model_type": "qwen2"},
}
TINY_DECODER = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
TINY_POOLER = {"num_latents": 5, "num_heads": 2, "head_dim": 8}


def tiny(family="llama", lora_r=0, **values) -> LLMEmbeddingModel:
    torch.manual_seed(0)
    config = LLMEmbeddingConfig(decoder_config={**FAMILIES[family], **TINY_DECODER}, pooler_config=TINY_POOLER,
                                lora_r=lora_r, max_length=16, **values)
    return LLMEmbeddingModel(config).eval()


def rows(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 40, (n,), generator=generator).tolist() for n in lengths]


def left_pad(token_rows):
    width = max(map(len, token_rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in token_rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in token_rows])
    return ids, mask


def plain_decoder_states(model, token_row):
    """Hidden states of the decoder alone on one unpadded row (the reference each arm is checked against)."""
    with torch.no_grad():
        return model.decoder(input_ids=torch.tensor([token_row]), output_hidden_states=True).hidden_states


# ---------------------------------------------------------------- pooler


def naive_pooler(pooler: TrainablePooler, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The pooler written out per example and per head with explicit softmax (no SDPA, no batching)."""
    config = pooler.config
    attention, ffn = pooler.cross_attention, pooler.feed_forward
    outputs = []
    for b in range(states.shape[0]):
        x = states[b]
        if pooler.layer_embedding is not None:
            x = x + pooler.layer_embedding.weight
        keep = torch.ones(len(x), dtype=torch.bool) if mask is None else mask[b].bool()
        x = x[keep]
        latents = pooler.latents
        q = F.layer_norm(latents, (config.latent_size,), attention.norm_latents.weight, attention.norm_latents.bias,
                         config.layer_norm_eps) @ attention.to_q.weight.T
        kv = F.layer_norm(x, (config.hidden_size,), attention.norm_states.weight, attention.norm_states.bias,
                          config.layer_norm_eps) @ attention.to_kv.weight.T
        k, v = kv[:, : kv.shape[1] // 2], kv[:, kv.shape[1] // 2:]
        heads = []
        for h in range(config.num_heads):
            cols = slice(h * config.head_dim, (h + 1) * config.head_dim)
            weights = torch.softmax(q[:, cols] @ k[:, cols].T / config.head_dim ** 0.5, dim=-1)
            heads.append(weights @ v[:, cols])
        latents = latents + torch.cat(heads, -1) @ attention.to_out.weight.T
        hidden = F.layer_norm(latents, (config.latent_size,), ffn.norm.weight, ffn.norm.bias, config.layer_norm_eps)
        hidden = hidden @ ffn.proj_in.weight.T + ffn.proj_in.bias
        value, gate = hidden[:, : hidden.shape[1] // 2], hidden[:, hidden.shape[1] // 2:]
        latents = latents + (value * F.gelu(gate)) @ ffn.proj_out.weight.T + ffn.proj_out.bias
        mean = latents.mean(0)
        outputs.append(mean / mean.norm())
    return torch.stack(outputs)


@pytest.mark.parametrize("num_layers", [None, 3])
def test_pooler_matches_a_per_head_loop_and_ignores_masked_keys(num_layers):
    torch.manual_seed(0)
    pooler = TrainablePooler(TrainablePoolerConfig(hidden_size=12, latent_dim=10, num_layers=num_layers,
                                                   **TINY_POOLER))
    for p in pooler.parameters():
        torch.nn.init.normal_(p, std=0.3)
    states = torch.randn(2, 3, 12)
    mask = None if num_layers else torch.tensor([[0, 1, 1], [1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(pooler(states, mask), naive_pooler(pooler, states, mask), atol=1e-5, rtol=1e-5)
        if mask is not None:  # a masked key's value never matters
            changed = states.clone()
            changed[0, 0] += 100
            torch.testing.assert_close(pooler(changed, mask), pooler(states, mask), atol=0, rtol=0)


def test_paper_size_pooler_and_model_reproduce_the_parameter_counts():
    """The 4096-d pooler has about 1.28B parameters (notes §2.2); Mistral-7B's decoder 7,110,660,096."""
    d, latents, inner, ffn = 4096, 768, 32 * 2048, 4 * 4096
    pooler = (latents * d + 3 * 2 * d  # latents; the three LayerNorms
              + d * inner + d * 2 * inner + inner * d  # to_q, to_kv, to_out
              + d * 2 * ffn + 2 * ffn + ffn * d + d)  # GEGLU in (with bias) and out
    assert round(pooler / 1e9, 2) == 1.28
    lora_per_layer = 16 * ((d + d) * 2 + (d + 1024) * 2 + (d + 14336) * 3)  # q, o; k, v; gate, up, down
    with torch.device("meta"):
        model = hfpapers.create_model("llm-embedding", "mistral-7b-model-5")
        model_2 = hfpapers.create_model("llm-embedding", "mistral-7b-model-2")
    assert sum(p.numel() for p in model.pooler.parameters()) == pooler + 32 * d  # + the layer embedding
    assert sum(p.numel() for p in model_2.pooler.parameters()) == pooler
    assert sum(p.numel() for p in model.parameters()) == 7_110_660_096 + 32 * lora_per_layer + pooler + 32 * d
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 32 * lora_per_layer + pooler + 32 * d


# ---------------------------------------------------------------- the five arms


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_arm_feeds_its_pooling_what_the_paper_feeds_it(arm):
    model = tiny(**ARMS[arm])
    token_rows = rows([3, 6, 5])
    ids, mask = left_pad(token_rows)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    for b, row in enumerate(token_rows):
        states = plain_decoder_states(model, row) if ARMS[arm]["attention"] == "causal" else None
        if states is None:  # bidirectional: the decoder alone, with its attention made non-causal
            with torch.no_grad():
                states = model.decoder(input_ids=torch.tensor([row]), output_hidden_states=True,
                                       attention_mask=torch.ones(1, len(row), dtype=torch.long)).hidden_states
        pooling = ARMS[arm]["pooling"]
        if pooling == "eos":
            expected = states[-1][0, -1:]
        elif pooling == "trainable":
            expected = states[-1][0, -1:] if ARMS[arm]["attention"] == "causal" else states[-1][0]
        elif ARMS[arm]["attention"] == "causal":
            expected = torch.stack([h[0, -1] for h in states[1:]])
        else:
            expected = torch.stack([h[0].mean(0) for h in states[1:]])
        got = out.pooler_inputs[b]
        if pooling == "trainable" and ARMS[arm]["attention"] == "bidirectional":
            got = got[-len(row):]  # the padded positions are masked out of the pooler
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        alone = model(input_ids=torch.tensor([row])).embeddings[0]
        torch.testing.assert_close(out.embeddings[b], alone.detach(), atol=1e-5, rtol=1e-5)


def test_mean_pooling_is_the_masked_mean_of_the_last_layer():
    model = tiny(pooling="mean", attention="causal")
    token_rows = rows([2, 7])
    ids, mask = left_pad(token_rows)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    for b, row in enumerate(token_rows):
        mean = plain_decoder_states(model, row)[-1][0].mean(0)
        torch.testing.assert_close(out.embeddings[b], mean / mean.norm(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bidirectional_attention_sees_the_future_and_causal_does_not(family):
    ids = torch.tensor([rows([6])[0]])
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 36 + 4
    for attention, first_changes in (("bidirectional", True), ("causal", False)):
        model = tiny(family, pooling="mean", attention=attention)
        with torch.no_grad():
            a, b = (model(input_ids=x).last_hidden_state[0, 0] for x in (ids, changed))
        assert (not torch.allclose(a, b, atol=1e-6)) == first_changes, (family, attention)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_a_left_padded_batch_equals_each_text_alone(family, attention):
    model = tiny(family, pooling="multi_layer_trainable", attention=attention)
    token_rows = rows([2, 7, 4], seed=1)
    ids, mask = left_pad(token_rows)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask)
        for b, row in enumerate(token_rows):
            alone = model(input_ids=torch.tensor([row]))
            torch.testing.assert_close(batched.last_hidden_state[b, -len(row):], alone.last_hidden_state[0],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.embeddings[b], alone.embeddings[0], atol=1e-5, rtol=1e-5)


def test_causal_mode_leaves_the_decoder_untouched():
    from transformers import AutoConfig

    model = tiny("mistral", pooling="eos", attention="causal")
    reference = AutoModel.from_config(AutoConfig.for_model(**{**FAMILIES["mistral"], **TINY_DECODER})).eval()
    reference.load_state_dict(model.decoder.state_dict())
    row = rows([6])[0]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([row])).last_hidden_state
        torch.testing.assert_close(model(input_ids=torch.tensor([row])).last_hidden_state, expected, atol=0, rtol=0)


def test_lora_starts_at_the_base_and_trains_only_adapters_and_pooler():
    model = tiny(lora_r=4, pooling="trainable", attention="bidirectional")
    base = tiny(lora_r=0, pooling="trainable", attention="bidirectional")
    ids, mask = left_pad(rows([3, 5]))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).embeddings,
                                   base(input_ids=ids, attention_mask=mask).embeddings, atol=1e-6, rtol=1e-6)
    trainable = {n.split(".")[0] if n.startswith("pooler") else n.rsplit(".", 3)[-3]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"pooler", "lora_A", "lora_B"}
    targets = {n.split(".")[-4] for n, p in model.named_parameters() if "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---------------------------------------------------------------- bad input


def test_bad_inputs_and_configs_are_clear_errors():
    from transformers import BertConfig

    from hfpapers.data.text import build_word_tokenizer

    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(StrictDataclassClassValidationError, match="pooling must be one of"):
        LLMEmbeddingConfig(decoder_config={**FAMILIES["llama"], **TINY_DECODER}, pooling="cls")
    with pytest.raises(StrictDataclassClassValidationError, match="attention must be one of"):
        LLMEmbeddingConfig(decoder_config={**FAMILIES["llama"], **TINY_DECODER}, attention="sideways")
    bert = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match="is not a causal decoder"):
        LLMEmbeddingModel(LLMEmbeddingConfig(decoder_config=bert.to_dict(), pooling="eos", lora_r=0))
    tokenizer = build_word_tokenizer()
    with pytest.raises(ValueError, match="empty text"):
        tokenize(tokenizer, ["the fox", "  "], max_length=16)
    long_text = " ".join(["fox"] * 20)
    with pytest.raises(ValueError, match="over max_length=16; pass truncation=True"):
        tokenize(tokenizer, [long_text], max_length=16)
    cut = tokenize(tokenizer, [long_text, "the fox"], max_length=16, truncation=True)
    assert cut["input_ids"].shape == (2, 16) and (cut["input_ids"][:, -1] == tokenizer.eos_token_id).all()
    model = tiny(pooling="eos", attention="causal")
    with pytest.raises(ValueError, match="left-padded"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0]]))


# ---------------------------------------------------------------- loss, gathering, gradient cache


def test_info_nce_matches_a_loop_over_queries():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(4, 6), dim=-1) for _ in range(3))
    candidates = torch.cat([p, n])
    expected = 0.0
    for i in range(4):
        logits = torch.tensor([float(q[i] @ c) / 0.05 for c in candidates])
        expected += -(logits[i] - torch.logsumexp(logits, 0)) / 4
    torch.testing.assert_close(info_nce(q, p, n, 0.05), expected, atol=1e-5, rtol=1e-5)


def _gather_worker(rank, world, port, path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    q, p, n = (torch.randn(2 * world, 5) for _ in range(3))
    local = [t[2 * rank:2 * rank + 2].clone().requires_grad_() for t in (q, p, n)]
    loss = info_nce(*(gather_with_grad(t) for t in local))
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [t.grad for t in local]}, f"{path}/rank{rank}.pt")
    dist.destroy_process_group()


def test_negatives_are_gathered_from_every_process_with_gradient(tmp_path):
    """Two gloo processes, two examples each: each rank's loss is the loss of the whole 4-query batch, and each
    rank's gradient is (world size x) the full-batch gradient of its own slice, as with the official AllGather."""
    import torch.multiprocessing as mp
    from accelerate.test_utils.testing import get_torch_dist_unique_port

    mp.spawn(_gather_worker, args=(2, get_torch_dist_unique_port(), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    full = [torch.randn(4, 5).requires_grad_() for _ in range(3)]
    loss = info_nce(*full)
    loss.backward()
    for rank in range(2):
        # test-written file of plain tensors, read back with weights_only
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach())
        for grad, reference in zip(got["grads"], full):
            torch.testing.assert_close(grad, 2 * reference.grad[2 * rank:2 * rank + 2], atol=1e-6, rtol=1e-5)


def test_gradient_cache_gives_the_gradients_of_the_whole_batch():
    from accelerate import Accelerator

    from hfpapers.methods.llm_embedding.recipe import LLMEmbeddingRecipe

    model = tiny(lora_r=4, lora_dropout=0.0, pooling="multi_layer_trainable", attention="bidirectional").train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = {field: dict(zip(("input_ids", "attention_mask"), left_pad(rows([3, 5, 4, 2, 6], seed=i))))
             for i, field in enumerate(("query", "positive", "negative"))}
    accelerator = Accelerator(cpu=True)
    grads = []
    for recipe in (LLMEmbeddingRecipe(), LLMEmbeddingRecipe(gradient_cache=True, cache_chunk_size=2)):
        model.zero_grad()
        loss = recipe.backward(accelerator, model, batch, torch.Generator(), TrainingState())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert loss.requires_grad is False
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- saving, loading, pipeline


def test_save_load_and_pipeline_give_the_exact_normalised_embeddings(tmp_path):
    from transformers import pipeline

    from hfpapers.data.text import build_word_tokenizer

    torch.manual_seed(0)
    model = hfpapers.create_model("llm-embedding", "tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # trained-looking LoRA and pooler
    tokenizer = build_word_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    texts = ["the fox is red", "where is the owl found today"]
    inputs = tokenize(tokenizer, texts, model.config.max_length)
    with torch.no_grad():
        expected = model(**inputs).embeddings
        assert torch.equal(loaded(**inputs).embeddings, expected)
    embed = pipeline("sentence-embedding", model=str(tmp_path))
    vectors = torch.tensor(embed(texts))
    torch.testing.assert_close(vectors, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))
    # The standard feature-extraction task sees the same vector: the tokenizer wraps texts in <s> ... </s>.
    features = torch.tensor(pipeline("feature-extraction", model=str(tmp_path))(texts[0]))
    torch.testing.assert_close(features[0], expected[0], atol=1e-6, rtol=1e-6)


def test_remote_code_checkpoint_loads_without_hfpapers(tmp_path):
    import subprocess

    model = hfpapers.create_model("llm-embedding", "tiny-model-4").eval()
    model.save_pretrained(tmp_path)
    ids, mask = left_pad(rows([3, 6]))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).embeddings
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "probe.pt")
    code = (f"import sys; sys.modules['hfpapers'] = None; import torch; from transformers import AutoModel; "
            f"m = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval(); "
            f"d = torch.load({str(tmp_path / 'probe.pt')!r}, weights_only=True); "
            f"print(torch.equal(m(input_ids=d['ids'], attention_mask=d['mask']).embeddings, d['expected']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.strip().endswith("True"), proc.stderr[-2000:]


# ---------------------------------------------------------------- evaluation


def lookup(table: dict):
    """An embed function from a fixed text -> vector table (normalised)."""
    import numpy as np

    def embed(texts):
        vectors = np.array([table[t] for t in texts], dtype=float)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return embed


def test_retrieval_scores_on_a_hand_ranked_example():
    from hfpapers.methods.llm_embedding.metrics import retrieval_scores

    # Query q1's relevant document d2 ranks second (after d1), q2's relevant d3 ranks first.
    embed = lookup({"q1": [1, 0, 0], "q2": [0, 0, 1], "d1": [1, 0, 0], "d2": [0.8, 0.6, 0], "d3": [0, 0.1, 1]})
    scores = retrieval_scores(embed, ["q1", "q2"], ["d1", "d2", "d3"], [[1], [2]])
    import math

    assert scores["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert scores["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)


def test_sts_classification_and_clustering_on_hand_made_embeddings():
    import numpy as np

    from hfpapers.methods.llm_embedding.metrics import (
        classification_accuracy, clustering_v_measure, sts_spearman,
    )

    # Cosines of the pairs are 1, 0.8, 0 (in that order); gold scores in the same order -> Spearman 1,
    # reversed -> -1.
    embed = lookup({"a": [1, 0], "b": [1, 0], "c": [0.8, 0.6], "d": [0, 1]})
    assert sts_spearman(embed, ["a", "a", "a"], ["b", "c", "d"], [5, 3, 1]) == pytest.approx(1.0)
    assert sts_spearman(embed, ["a", "a", "a"], ["b", "c", "d"], [1, 3, 5]) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 5
    texts = [f"t{i}" for i in range(60)]
    labels = [i % 3 for i in range(60)]
    embed = lookup({t: centres[y] + rng.normal(size=3) * 0.1 for t, y in zip(texts, labels)})
    assert classification_accuracy(embed, texts, labels) == 1.0
    assert clustering_v_measure(embed, texts, labels) == pytest.approx(1.0)
    shuffled = list(rng.permutation(labels))
    assert clustering_v_measure(embed, texts, shuffled) < 0.2


def test_paired_wilcoxon_table_stars_only_a_consistent_difference():
    from hfpapers.methods.llm_embedding.metrics import format_table, paired_comparison

    names = [f"d{i}" for i in range(6)]
    base = {"sts": {n: 0.5 for n in names}, "retrieval": {n: 0.4 for n in names}}
    # sts: +0.01 on all six datasets -> exact two-sided p = 2 / 2**6; retrieval: mixed signs -> not significant.
    better = {"sts": {n: 0.51 for n in names},
              "retrieval": {n: 0.4 + d for n, d in zip(names, [0.02, -0.03, 0.01, -0.01, 0.03, -0.02])}}
    comparison = paired_comparison(base, better)
    assert comparison["sts"][0] == pytest.approx(0.01) and comparison["sts"][1] == pytest.approx(2 / 64)
    assert comparison["sts"][2] and not comparison["retrieval"][2]
    table = format_table({"model-1": base, "model-5": better}, baseline="model-1")
    assert "| model-1 (absolute) | 0.5000 | 0.4000 |" in table
    assert "| model-5 (Δ) | +0.0100* | +0.0000 |" in table


def test_embedded_text_data_is_deterministic_and_answerable():
    from hfpapers.data import load
    from hfpapers.data.text import FACTS, build_eval_suite, build_word_tokenizer

    a = load("triplets", num_train=50, num_test=10)
    assert a["train"].to_list() == load("triplets", num_train=50, num_test=10)["train"].to_list()
    assert a["train"].to_list() != load("triplets", num_train=50, num_test=10, seed=1)["train"].to_list()
    # Every positive states the fact kind the query asks about; the tokenizer knows every word.
    kind_words = {kind: {w for values in FACTS[kind] for v in values for w in v.split()} for kind in FACTS}
    tokenizer = build_word_tokenizer()
    for row in a["train"]:
        assert row["positive"] != row["negative"]
        for text in row.values():
            assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
        asked = [k for k, words in kind_words.items() if set(row["positive"].split()) & words]
        assert asked
    suite = build_eval_suite(sets_per_category=2, size=16)
    assert {k: len(v) for k, v in suite.items()} == {"sts": 2, "classification": 2, "retrieval": 2,
                                                     "clustering": 2}
    retrieval = suite["retrieval"][0]
    assert all(0 <= i < len(retrieval["corpus"]) for gold in retrieval["relevant"] for i in gold)


# ---------------------------------------------------------------- conversion of official checkpoints


def official_artifacts(tmp_path, arm, model):
    """What the official trainer writes for `model`'s architecture: a peft adapter folder with official key
    names and an `attn_pool.pt` holding the PerceiverResampler's state dict (32 layer rows, as the official
    code allocates), filled with random values."""
    import json

    from safetensors.torch import save_file

    from hfpapers.methods.llm_embedding.convert_llm_embedding import POOLER_KEYS

    torch.manual_seed(1)
    adapter = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:  # decoder.layers.0.self_attn.q_proj.lora_A.default.weight
            module, ab = name[len("decoder."):].split(".lora_")
            adapter[f"base_model.model.{module}.lora_{ab.split('.')[0]}.weight"] = torch.randn_like(tensor)
    folder = tmp_path / arm
    folder.mkdir()
    save_file(adapter, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": model.config.lora_r, "lora_alpha": model.config.lora_alpha, "lora_dropout": 0.1,
         "target_modules": list(model.config.lora_target_modules), "peft_type": "LORA"}))
    pooler = {}
    if model.pooler is not None:
        ours = dict(model.pooler.state_dict())
        for official, mine in POOLER_KEYS.items():
            if mine == "layer_embedding.weight":
                if model.pooler.layer_embedding is not None:
                    pooler[official] = torch.randn(32, ours[mine].shape[1])
            else:
                pooler[official] = torch.randn_like(ours[mine])
        torch.save(pooler, folder / "attn_pool.pt")
    return folder, adapter, pooler


@pytest.mark.parametrize("arm", ["model-1", "model-5"])
def test_official_adapter_and_pooler_convert_with_every_key(arm, tmp_path):
    from hfpapers.data.text import build_word_tokenizer
    from hfpapers.methods.llm_embedding.convert_llm_embedding import convert_adapter

    torch.manual_seed(0)
    base = tmp_path / "base"
    decoder = AutoModel.from_config(hfpapers.create_model("llm-embedding", "tiny").config.decoder_config)
    decoder.save_pretrained(base)
    build_word_tokenizer().save_pretrained(base)
    template = hfpapers.create_model("llm-embedding", f"tiny-{arm}")
    folder, adapter, pooler = official_artifacts(tmp_path, arm, template)
    pooler_config = template.config.pooler_config.to_dict() if template.pooler is not None else None
    converted = convert_adapter(folder, tmp_path / "out", str(base), arm, pooler_config=pooler_config,
                                max_length=template.config.max_length)
    state = converted.state_dict()
    for key, tensor in adapter.items():
        ours = "decoder." + key[len("base_model.model."):].replace(".weight", ".default.weight")
        assert torch.equal(state[ours], tensor), key
    if pooler:
        assert torch.equal(state["pooler.latents"], pooler["latents"])
        assert torch.equal(state["pooler.cross_attention.to_kv.weight"], pooler["cross_attend_blocks.0.fn.to_kv.weight"])
        assert torch.equal(state["pooler.layer_embedding.weight"], pooler["pos_emb.weight"][:4])
    assert torch.equal(state["decoder.embed_tokens.weight"], decoder.state_dict()["embed_tokens.weight"])
    reloaded = AutoModel.from_pretrained(tmp_path / "out").eval()
    ids, mask = left_pad(rows([3, 5]))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).embeddings,
                                   converted.eval()(input_ids=ids, attention_mask=mask).embeddings)


def test_hfpapers_convert_writes_the_adapter_and_names_a_missing_half(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from hfpapers.cli import main
    from hfpapers.data.text import build_word_tokenizer

    base = tmp_path / "base"
    AutoModel.from_config(hfpapers.create_model("llm-embedding", "tiny").config.decoder_config).save_pretrained(base)
    build_word_tokenizer().save_pretrained(base)
    folder, adapter, _ = official_artifacts(tmp_path, "model-1", hfpapers.create_model("llm-embedding", "tiny-model-1"))
    args = ["convert", "llm-embedding", str(folder), str(tmp_path / "out"), "--base", str(base), "--arm", "model-1"]
    assert main(args) == 0
    assert "saved model-1" in capsys.readouterr().out
    state = AutoModel.from_pretrained(tmp_path / "out").state_dict()
    key = "base_model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert torch.equal(state["decoder.layers.1.self_attn.v_proj.lora_B.default.weight"], adapter[key])
    # one half of a LoRA pair gone: one line naming the model key nothing filled
    save_file({k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if k != key},
              folder / "adapter_model.safetensors")
    assert main([*args[:3], str(tmp_path / "out2"), *args[4:]]) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after the base decoder's loading bar
    assert error.startswith("hfpapers convert: error: the official model-1 checkpoint does not fit the model: "
                            "missing keys (1): decoder.layers.1.self_attn.v_proj.lora_B.default.weight")


def test_an_unknown_official_key_stops_the_conversion():
    from hfpapers.methods.llm_embedding.convert_llm_embedding import (
        convert_lora_state_dict, convert_pooler_state_dict,
    )

    with pytest.raises(ValueError, match="attn_pool keys with no mapping: cross_attend_blocks.2.fn.weight"):
        convert_pooler_state_dict({"latents": torch.zeros(2, 2), "cross_attend_blocks.2.fn.weight": torch.zeros(1)},
                                  None)
    with pytest.raises(ValueError, match="not LoRA A/B weights: base_model.model.score.weight"):
        convert_lora_state_dict({"base_model.model.score.weight": torch.zeros(1)})


# ---------------------------------------------------------------- the small-scale reproduction


def test_reproduction_trains_the_five_arms_and_tabulates_them(tmp_path):
    """The reproduction at a smaller size: every arm trains from the same warmed-up decoder, reloads, and the
    table's baseline row is the mean of its per-dataset scores."""
    sys.path.insert(0, str(REPO / "evaluation" / "reproduce"))
    from llm_embedding_arms import reproduce

    results, table = reproduce(str(tmp_path), sets_per_category=2, suite_size=16,
                               dataset_kwargs={"num_train": 96, "num_test": 32}, num_epochs=1, pretrain_epochs=1,
                               per_device_train_batch_size=16)
    assert list(results) == list(ARMS)
    base = read_json(tmp_path / "model-1" / "config.json")["base_model_name_or_path"]
    for arm in ARMS:
        assert {k: len(v) for k, v in results[arm].items()} == {"sts": 2, "classification": 2, "retrieval": 2,
                                                               "clustering": 2}
        config = read_json(tmp_path / arm / "config.json")
        assert config["base_model_name_or_path"] == base and (config["pooling"], config["attention"]) == tuple(
            ARMS[arm].values())
    sts = sum(results["model-1"]["sts"].values()) / 2
    assert f"| model-1 (absolute) | {sts:.4f} |" in table
    assert sum(line.startswith("| model-") and "(Δ)" in line for line in table.splitlines()) == 4


def test_pooler_width_follows_the_decoder_unless_set():
    decoder = {**FAMILIES["llama"], **TINY_DECODER}
    follows = LLMEmbeddingConfig(decoder_config=decoder, pooling="trainable", pooler_config=TINY_POOLER)
    assert (follows.pooler_config.hidden_size, follows.pooler_config.latent_size) == (32, 32)
    explicit = LLMEmbeddingConfig(decoder_config=decoder, pooling="trainable",
                                  pooler_config={**TINY_POOLER, "latent_dim": 4096})
    assert (explicit.pooler_config.hidden_size, explicit.pooler_config.latent_size) == (32, 4096)
