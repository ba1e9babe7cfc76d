import subprocess
import sys

import pytest
from transformers import Pipeline

import hfpapers
from hfpapers.registry import MethodRecord


def test_records_describe_each_method():
    records = hfpapers.list_methods()
    assert [(r.slug, r.kind) for r in records] == [
        ("croco", "model"), ("efficientvim", "model"), ("ftwt", "model"), ("gs-lora", "procedure"),
        ("layerdiffusion", "diffusers"), ("llm-embedding", "model"), ("nc-deep-linear", "analysis"),
        ("nc-mixup", "analysis"), ("nc-perturbation", "analysis"), ("r-amt", "adapter"), ("read", "model"),
        ("scaling-mlp", "model"), ("tract", "procedure")]
    assert hfpapers.get_method("gs-lora").arxiv_ids == ("2403.11530", "2501.09705")
    record = hfpapers.get_method("scaling-mlp")
    assert isinstance(record, MethodRecord)
    assert record.arxiv_id == "2306.13575" and record.task == "image-classification"
    assert record.model_type == "hfp-scaling-mlp" and record.status == "complete"
    assert set(record.paper_presets) <= set(record.presets) and record.default_preset in record.presets
    assert record.bibtex.startswith("@") and record.time_budget_s > 0


def test_unknown_slug_and_preset_name_the_known_ones():
    with pytest.raises(KeyError, match="known methods: croco, efficientvim, ftwt, gs-lora, layerdiffusion, "
                                       "llm-embedding, nc-deep-linear, nc-mixup, nc-perturbation, r-amt, read, "
                                       "scaling-mlp, tract"):
        hfpapers.get_method("no-such-paper")
    with pytest.raises(KeyError, match=r"known presets: tiny, B_6-Wi_512"):
        hfpapers.create_model("scaling-mlp", preset="huge")


def test_create_model_applies_preset_and_overrides():
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_blocks=3, num_labels=7)
    assert model.config.num_blocks == 3 and model.config.hidden_size == 128 and model.config.num_labels == 7
    assert type(model).__name__ == "ScalingMLPForImageClassification"
    base = hfpapers.create_model("scaling-mlp", preset="tiny", head="AutoModel")
    assert type(base).__name__ == "ScalingMLPModel"


def test_registration_is_idempotent_and_reaches_auto_classes():
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    hfpapers.register_with_transformers()
    hfpapers.register_with_transformers()
    config = AutoConfig.for_model("hfp-scaling-mlp", num_blocks=1, hidden_size=8, image_size=4)
    assert type(AutoModel.from_config(config)).__name__ == "ScalingMLPModel"
    assert type(AutoModelForImageClassification.from_config(config)).__name__ == "ScalingMLPForImageClassification"


IMPORT_ORDERS = {
    "auto class after hfpapers": "import hfpapers; from transformers import AutoModelForImageClassification as A",
    "pipeline after hfpapers": "import hfpapers; from transformers import pipeline, AutoModelForImageClassification as A",
    "transformers first": "from transformers import PreTrainedModel, AutoModelForImageClassification as A; import hfpapers",
    "config only": "import hfpapers; from transformers import AutoConfig; import transformers; A = transformers.AutoModelForImageClassification",
    # A method whose configuration imports AutoConfig itself, imported before anything else of transformers.
    "method module first": "from hfpapers.methods.llm_embedding import LLMEmbeddingConfig; import transformers; A = transformers.AutoModelForImageClassification",
    "recipe first": "import hfpapers.methods.llm_embedding.recipe; import transformers; A = transformers.AutoModelForImageClassification",
    # diffusers imports CLIP, which imports the Auto classes while CLIP's image processor is still importing.
    "diffusers after hfpapers": "import hfpapers; from diffusers import StableDiffusionPipeline; import transformers; A = transformers.AutoModelForImageClassification",
}


@pytest.mark.parametrize("code", IMPORT_ORDERS.values(), ids=IMPORT_ORDERS.keys())
def test_import_hfpapers_registers_in_any_import_order(code):
    probe = code + "; from transformers import AutoConfig; c = AutoConfig.for_model('hfp-scaling-mlp'); print(type(c) in A._model_mapping)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_import_is_cheap():
    """`import hfpapers` must not pull torch in (seconds); its own cost stays far under a second."""
    code = ("import sys, time; import transformers; t = time.perf_counter(); import hfpapers; "
            "hfpapers.list_methods(); print(time.perf_counter() - t, 'torch' in sys.modules)")
    seconds, torch_loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.split()
    assert torch_loaded == "False"
    assert float(seconds) < 1.0


class TopClassPipeline(Pipeline):
    """A minimal custom pipeline: the index of the top logit."""

    _load_processor = _load_image_processor = _load_feature_extractor = _load_tokenizer = False

    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def preprocess(self, pixel_values):
        return {"pixel_values": pixel_values}

    def _forward(self, inputs):
        return self.model(**inputs)

    def postprocess(self, outputs):
        return int(outputs.logits.argmax(-1)[0])


def test_a_record_with_a_custom_pipeline_registers_it():
    import dataclasses

    import torch
    from transformers import pipeline
    from transformers.pipelines import PIPELINE_REGISTRY

    record = dataclasses.replace(hfpapers.get_method("scaling-mlp"), task="hfp-test-top-class",
                                 pipeline_class=f"{__name__}.TopClassPipeline")
    hfpapers.register_record(record)
    assert "hfp-test-top-class" in PIPELINE_REGISTRY.get_supported_tasks()
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=5).eval()
    x = torch.randn(1, 3, 16, 16)
    assert pipeline("hfp-test-top-class", model=model)(x) == int(model(pixel_values=x).logits.argmax())


def test_a_record_missing_a_piece_of_its_kind_is_refused():
    import dataclasses

    record = hfpapers.get_method("scaling-mlp")
    with pytest.raises(ValueError, match="kind 'plugin' is not one of model, diffusers"):
        dataclasses.replace(record, kind="plugin")
    with pytest.raises(ValueError, match="a 'procedure' record needs a runner"):
        dataclasses.replace(record, kind="procedure")
    with pytest.raises(ValueError, match="a 'model' record needs a recipe"):
        dataclasses.replace(record, recipe=None)
    with pytest.raises(ValueError, match=r"presets \['tiny'\] are not Preset objects"):
        dataclasses.replace(record, presets={**record.presets, "tiny": {"num_blocks": 1}})
    with pytest.raises(ValueError, match=r"presets \['huge'\] are named but not defined"):
        dataclasses.replace(record, default_preset="huge")


def test_a_method_that_fails_to_import_is_named_and_the_others_still_register(monkeypatch):
    """Registration cannot half-fail: the broken method is named, every other one is registered."""
    import dataclasses

    from hfpapers import registry

    broken = dataclasses.replace(hfpapers.get_method("scaling-mlp"), slug="broken-method",
                                 config_class="hfpapers.methods.no_such_module.Config")
    records = {**registry._records(), "broken-method": broken}
    monkeypatch.setattr(registry, "_RECORDS", records)
    monkeypatch.setattr(registry, "_registered", set())
    with pytest.raises(registry.RegistrationError, match="method 'broken-method' could not be registered"):
        hfpapers.register_with_transformers()
    listed = {slug for slug, record in records.items() if record.status == "complete"}  # drafts are not registered
    assert registry._registered == listed - {"broken-method"}
