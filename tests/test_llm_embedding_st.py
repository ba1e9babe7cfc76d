"""The embedding models in their users' own tools: sentence-transformers loads a saved folder (without hfpapers) and
gives the pipeline's vectors, MTEB scores it on a local task, and peft loads the decoder's LoRA."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, pipeline

import hfpapers
from hfpapers.hub import push
from hfpapers.methods.llm_embedding.modeling_llm_embedding import LLMEmbeddingModel
from hfpapers.methods.llm_embedding.recipe import load_tokenizer
from hfpapers.testing import LocalHub

# Different lengths (left padding in one batch), and one over the tiny presets' 64 tokens (cut to 63 + EOS).
TEXTS = ["the fox is red", "where is the owl found today", "a cat", "the dog runs in the woods at night",
         "the fox is red " * 30]


def trained_looking(preset: str) -> tuple[LLMEmbeddingModel, object]:
    """A tiny model with non-zero LoRA and a moved pooler (a fresh LoRA is the identity), and its tokenizer."""
    torch.manual_seed(0)
    model = hfpapers.create_model("llm-embedding", preset=preset).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model, load_tokenizer(model.config)


def without_eos(tokenizer):
    """The word tokenizer with a post-processor that adds BOS only (as Mistral's and Llama's do by default)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    assert tokenizer(["the fox"])["input_ids"][0][-1] != tokenizer.eos_token_id
    return tokenizer


def saved(tmp_path, preset: str, eos_from_tokenizer: bool = True):
    model, tokenizer = trained_looking(preset)
    folder = tmp_path / preset
    model.save_pretrained(folder)
    (tokenizer if eos_from_tokenizer else without_eos(tokenizer)).save_pretrained(folder)
    return folder, model


def test_sentence_transformers_loads_the_folder_without_hfpapers_and_gives_the_pipeline_vectors(tmp_path):
    pytest.importorskip("sentence_transformers")
    # Model 1 (EOS state, tokenizer without EOS: the module appends it) and Model 5 (pooler, tokenizer adds EOS;
    # last, so that the prompt and re-save checks below use it).
    cases = {name: saved(tmp_path, preset, eos)[0]
             for name, preset, eos in (("model-1", "tiny-model-1", False), ("model-5", "tiny", True))}
    embedders = {name: pipeline("sentence-embedding", model=str(folder)) for name, folder in cases.items()}
    expected = {name: torch.tensor(embed(TEXTS, truncation=True)) for name, embed in embedders.items()}
    # sentence-transformers' prompts are the pipeline's instruction (prepended without a separator).
    expected["prompted"] = torch.tensor(embedders["model-5"](TEXTS[:3], instruction="where is "))
    torch.save(expected, tmp_path / "expected.pt")
    # Model 1 from a Hub repo (every file, the sentence-transformers module's code included, comes from the Hub).
    sources = {"model-1": "someone/tiny-embedder", "model-5": str(cases["model-5"])}
    code = f"""
import json, sys
sys.modules["hfpapers"] = None
import torch
from sentence_transformers import SentenceTransformer
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
report = {{}}
for name, source in {json.dumps(sources)}.items():
    st = SentenceTransformer(source, trust_remote_code=True, device="cpu")
    vectors = st.encode({TEXTS!r}, batch_size=2, convert_to_tensor=True)
    report[name] = {{"modules": [type(m).__name__ for m in st], "dim": st.get_embedding_dimension(),
                    "max_diff": (vectors - expected[name]).abs().max().item(),
                    "similarity": st.similarity_fn_name}}
prompted = st.encode({TEXTS[:3]!r}, prompt="where is ", convert_to_tensor=True)
st.save(source + "-resaved")  # sentence-transformers' own save of the remote-code model loads back the same
resaved = SentenceTransformer(source + "-resaved", trust_remote_code=True, device="cpu")
again = resaved.encode({TEXTS!r}, batch_size=2, convert_to_tensor=True)
report["round trip"] = {{"prompt_diff": (prompted - expected["prompted"]).abs().max().item(),
                        "resave_diff": (again - vectors).abs().max().item()}}
print(json.dumps(report))
"""
    with LocalHub(tmp_path / "hub") as hub:
        push(cases["model-1"], sources["model-1"], endpoint=hub.url, token=hub.token)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    round_trip = report.pop("round trip")
    assert round_trip["prompt_diff"] < 1e-5 and round_trip["resave_diff"] == 0, round_trip
    assert set(report) == set(cases)
    for name, result in report.items():
        # One module: the model pools and normalises itself (no second Pooling / Normalize).
        assert result["modules"] == ["LLMEmbeddingTransformer"], name
        assert result["dim"] == expected[name].shape[1] == 64 and result["similarity"] == "cosine", name
        assert result["max_diff"] < 1e-5, (name, result)


def test_the_module_appends_eos_where_a_plain_tokenizer_call_would_not(tmp_path):
    """Without the module's own tokenisation (sentence-transformers' call of the tokenizer), a tokenizer that adds
    no EOS gives another vector than the pipeline: the test above would catch a module that lost it."""
    pytest.importorskip("sentence_transformers")
    folder, model = saved(tmp_path, "tiny-model-1", eos_from_tokenizer=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")  # saved with padding_side="left"
    with torch.no_grad():
        bare = model(**plain).embeddings
    ours = torch.tensor(pipeline("sentence-embedding", model=str(folder))(TEXTS[:2]))
    assert (bare - ours).abs().max() > 1e-2


def test_mteb_scores_the_sentence_transformers_model_on_a_local_sts_task(tmp_path):
    pytest.importorskip("sentence_transformers")
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata
    from sentence_transformers import SentenceTransformer

    pairs = [("the fox is red", "the fox is brown", 4.0), ("where is the owl found", "the owl is in the woods", 3.5),
             ("a cat", "the sea at night", 0.0), ("the dog runs", "a dog runs fast", 5.0),
             ("the owl sleeps by day", "the fox hunts at night", 1.0), ("the sea is cold", "the water is cold", 3.0),
             ("where is the cat", "the red fox", 0.5)]

    class TinySTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name="HfpTinySTS", description="Hand-made sentence pairs scored 0-5.", reference=None,
            dataset={"path": "local/hfp-tiny-sts", "revision": "local"}, type="STS", category="t2t",
            modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="cosine_spearman",
            date=("2024-01-01", "2024-01-01"), domains=[], task_subtypes=[], license="cc-by-4.0",
            annotations_creators="human-annotated", dialect=[], sample_creation="created", bibtex_citation="")
        min_score, max_score = 0, 5

        def load_data(self, **kwargs):
            columns = dict(zip(("sentence1", "sentence2", "score"), map(list, zip(*pairs))))
            self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
            self.data_loaded = True

    folder, _ = saved(tmp_path, "tiny")
    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    result = mteb.evaluate(model, TinySTS(), cache=None, show_progress_bar=False, co2_tracker=False)
    scores = result.task_results[0].scores["test"][0]

    # Independently: the pipeline's vectors, their cosines, and Spearman's rho as Pearson's r of the ranks.
    embed = pipeline("sentence-embedding", model=str(folder))
    first, second = (torch.tensor(embed([p[i] for p in pairs]), dtype=torch.float64) for i in (0, 1))
    cosines = (first * second).sum(-1) / (first.norm(dim=-1) * second.norm(dim=-1))
    gold = torch.tensor([p[2] for p in pairs], dtype=torch.float64)

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).sum() / (x.norm() * y.norm()))

    def ranks(x):  # no ties in these values
        return torch.argsort(torch.argsort(x)).double()

    assert len(set(cosines.tolist())) == len(pairs)
    assert scores["main_score"] == scores["cosine_spearman"]
    assert scores["cosine_spearman"] == pytest.approx(pearson(ranks(cosines), ranks(gold)), abs=1e-9)
    assert scores["cosine_pearson"] == pytest.approx(pearson(cosines, gold), abs=1e-5)


def test_the_decoder_lora_loads_as_a_standard_peft_adapter(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = tmp_path / "base"
    preset = hfpapers.get_method("llm-embedding").preset("tiny-model-1")
    decoder = AutoModel.from_config(LLMEmbeddingModel.config_class(**preset).decoder_config)
    decoder.save_pretrained(base)
    model = LLMEmbeddingModel.from_decoder(str(base), pooling="eos", attention="causal", lora_r=4,
                                           max_length=preset["max_length"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B = 0 would make any adapter look right
    model.save_pretrained(tmp_path / "embedder")
    adapter = tmp_path / "embedder" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(tmp_path / "embedder"),
                                     subfolder="adapter").eval()
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.decoder(input_ids=ids).last_hidden_state
        theirs = peft(input_ids=ids).last_hidden_state
        untouched = AutoModel.from_pretrained(base)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)
    assert (untouched - ours).abs().max() > 1e-3  # the adapter changes the decoder, and peft applies it
    # A folder with the adapter still loads as our model (the adapter is in a subfolder, not at the root).
    reloaded = AutoModel.from_pretrained(tmp_path / "embedder").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.decoder(input_ids=ids).last_hidden_state, ours)


def test_a_model_without_lora_saves_no_adapter(tmp_path):
    model = hfpapers.create_model("llm-embedding", preset="tiny-model-1", lora_r=0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modules.json").is_file() and not (tmp_path / "adapter").exists()
    with pytest.raises(ValueError, match="no LoRA"):
        model.save_adapter(tmp_path / "adapter")
