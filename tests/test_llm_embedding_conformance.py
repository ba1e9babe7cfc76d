"""LLMEmbeddingModel against the contract of built-in transformers models: outputs, embeddings accessors, eager
vs SDPA (bidirectional attention stays bidirectional), inits on missing keys, float32 pooler, bad inputs."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from hfpapers.methods.llm_embedding import ARMS
from test_llm_embedding import left_pad, plain_decoder_states, rows, tiny


def test_outputs_hidden_states_tuples_and_inputs_embeds_like_a_builtin_model():
    model = tiny(pooling="eos", attention="causal")
    row = rows([6])[0]
    ids = torch.tensor([row])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=False)
        expected = plain_decoder_states(model, row)  # the decoder alone, unpadded
        assert len(out.hidden_states) == len(expected) == 4
        for a, b in zip(out.hidden_states, expected):
            torch.testing.assert_close(a, b)
        as_tuple = model(input_ids=ids, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.embeddings)
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).embeddings
        torch.testing.assert_close(from_embeds, out.embeddings)
    assert model.config.get_text_config() is model.config.decoder_config


def test_resize_token_embeddings_keeps_the_rows_and_updates_the_vocabulary():
    model = tiny(pooling="mean", attention="causal")
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(48)
    assert model.get_input_embeddings().weight.shape == (48, 32) and model.config.decoder_config.vocab_size == 48
    assert torch.equal(model.get_input_embeddings().weight[:40], old)
    model.set_input_embeddings(torch.nn.Embedding(48, 32))
    assert model.decoder.embed_tokens is model.get_input_embeddings()


@pytest.mark.parametrize("arm", list(ARMS))
def test_eager_and_sdpa_give_the_same_vectors_padded_and_unpadded(arm):
    model = tiny(**ARMS[arm])
    for batch in (left_pad(rows([5, 5], seed=2)), left_pad(rows([2, 6, 4], seed=3))):
        outputs = {}
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                outputs[implementation] = model(input_ids=batch[0], attention_mask=batch[1])
        torch.testing.assert_close(outputs["eager"].embeddings, outputs["sdpa"].embeddings, atol=1e-6, rtol=1e-5)
        real = batch[1].bool()  # pad positions attend to nothing under a causal mask: their states are noise
        torch.testing.assert_close(outputs["eager"].last_hidden_state[real], outputs["sdpa"].last_hidden_state[real],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_under_eager_attention_only_bidirectional_sees_the_last_token(attention):
    model = tiny(pooling="mean", attention=attention)
    model.set_attn_implementation("eager")
    ids = torch.tensor([rows([6])[0]])
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 36 + 4
    with torch.no_grad():
        a, b = (model(input_ids=x).last_hidden_state[0, 0] for x in (ids, changed))
    assert (not torch.allclose(a, b, atol=1e-6)) == (attention == "bidirectional")


def test_the_pooler_follows_the_attention_implementation():
    model = tiny(pooling="trainable", attention="bidirectional")
    states, mask = torch.randn(3, 7, 32), torch.tensor([[0, 0, 1, 1, 1, 1, 1]] * 2 + [[1] * 7])
    model.set_attn_implementation("eager")
    assert model.pooler.config._attn_implementation == "eager"
    seen = []
    handle = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: seen.append(1) or handle(*a, **k)
    try:
        with torch.no_grad():
            eager = model.pooler(states, mask)
            assert not seen  # the eager path never calls SDPA
            model.set_attn_implementation("sdpa")
            sdpa = model.pooler(states, mask)
    finally:
        torch.nn.functional.scaled_dot_product_attention = handle
    torch.testing.assert_close(eager, sdpa, atol=1e-6, rtol=0)


def test_missing_lora_keys_load_as_the_identity_adapter(tmp_path):
    model = tiny(lora_r=4, pooling="multi_layer_trainable", attention="bidirectional")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "lora_" not in k and not k.startswith("pooler.latents")},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModel.from_pretrained(tmp_path)
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in loaded.named_parameters() if "lora_A" in n]
    assert lora_b and all(torch.equal(p, torch.zeros_like(p)) for p in lora_b)
    assert all(torch.isfinite(p).all() and p.abs().max() <= 1 / p.shape[1] ** 0.5 + 1e-6 and p.std() > 0
               for p in lora_a)  # peft's Kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    latents = loaded.pooler.latents
    assert torch.isfinite(latents).all() and 0.5 < latents.std() < 1.5  # randn, as the official code
    loaded.initialize_weights()
    assert all(torch.equal(p, torch.zeros_like(p)) for p in lora_b)


def test_the_pooler_and_lora_stay_float32_under_a_bf16_decoder(tmp_path):
    model = tiny(lora_r=4, pooling="trainable", attention="bidirectional").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in loaded.named_parameters() if n.startswith("pooler.") or "lora_" in n} == {torch.float32}
    ids, mask = left_pad(rows([3, 5]))
    with torch.no_grad():
        assert loaded(input_ids=ids, attention_mask=mask).embeddings.dtype == torch.float32


def test_a_model_built_in_bf16_keeps_the_pooler_and_lora_in_float32():
    """`_keep_in_fp32_modules_strict` holds for a model built under a bf16 default (not only for from_pretrained)."""
    from hfpapers.methods.llm_embedding import LLMEmbeddingModel

    config = tiny(lora_r=4, pooling="trainable", attention="bidirectional").config
    model = LLMEmbeddingModel._from_config(config, dtype=torch.bfloat16)
    assert model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if n.startswith("pooler.") or "lora_" in n} == {torch.float32}
    ids, mask = left_pad(rows([3, 5]))
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).embeddings.dtype == torch.float32


def test_bad_pipeline_inputs_are_one_clear_error(tmp_path):
    import hfpapers
    from transformers import pipeline

    from hfpapers.data.text import build_word_tokenizer

    hfpapers.create_model("llm-embedding", "tiny").save_pretrained(tmp_path)
    build_word_tokenizer().save_pretrained(tmp_path)
    embed = pipeline("sentence-embedding", model=str(tmp_path))
    with pytest.raises(ValueError, match="empty list of texts"):
        embed([])
    with pytest.raises(TypeError, match="takes strings, got int"):
        embed([3])
    with pytest.raises(ValueError, match="empty text"):
        embed("   ")
    long_text = " ".join(["fox"] * 80)
    with pytest.raises(ValueError, match="over max_length=64; pass truncation=True"):
        embed(long_text)
    assert len(embed(long_text, truncation=True)) == 64


def test_the_folder_ships_its_pipeline_and_runs_it_where_hfpapers_cannot_be_imported(tmp_path):
    """config.json names the pipeline code saved beside the model (`custom_pipelines`, as `Pipeline.save_pretrained`
    writes it): without hfpapers, pipeline(..., trust_remote_code=True) runs it and gives the in-process vectors.
    With hfpapers, the registered pipeline still serves the task without trust_remote_code (transformers looks at
    a config's custom tasks first and would otherwise demand it)."""
    import json

    import hfpapers
    from transformers import pipeline

    from hfpapers.data.text import build_word_tokenizer
    from test_contract import run_without_hfpapers

    folder = tmp_path / "embedder"
    hfpapers.create_model("llm-embedding", "tiny").save_pretrained(folder)
    build_word_tokenizer().save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == {"sentence-embedding": {
        "impl": "pipeline_llm_embedding.SentenceEmbeddingPipeline", "pt": ["AutoModel"]}}
    embed = pipeline("sentence-embedding", model=str(folder))
    assert type(embed).__module__ == "hfpapers.methods.llm_embedding.pipeline_llm_embedding"
    texts = ["the fox is red", "where is the owl found today"]
    code = ("import json\nfrom transformers import pipeline\n"
            f"embed = pipeline('sentence-embedding', model={str(folder)!r}, trust_remote_code=True)\n"
            f"print(type(embed).__module__.split('.')[0], json.dumps(embed({texts!r})))\n")
    where, vectors = run_without_hfpapers(code, folder).split(" ", 1)
    assert where == "transformers_modules"
    torch.testing.assert_close(torch.tensor(json.loads(vectors)), torch.tensor(embed(texts)), atol=1e-6, rtol=1e-6)
