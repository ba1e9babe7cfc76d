"""The method contract (DESIGN.md), checked for every record of every kind: a new method gets these checks by
adding its record. Model classes also go through the common model tester (tests/test_models_common.py)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import hfpapers
from hfpapers.registry import KIND_LIBRARY, TRAINED_KINDS, Preset
from hfpapers.testing.tiny import bad_inputs, bad_settings

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hfpapers"
RECORDS = hfpapers.list_methods(include_drafts=True)  # a draft sees what it still lacks
IDS = [r.slug for r in RECORDS]
# Pipeline tags the Hub lists (huggingface.co/tasks) that our records use; any other tag is not a Hub task.
HUB_TASKS = {"image-classification", "feature-extraction", "sentence-similarity", "image-segmentation",
             "text-to-image", "image-to-image", "zero-shot-image-classification", "depth-estimation",
             "image-feature-extraction", "mask-generation"}


def folder_of(record) -> str:
    return record.recipe.split(".")[2] if record.recipe else record.runner.split(".")[2]


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_record_names_every_piece_of_its_kind(record):
    """Each piece the kind needs exists and imports; deleting one makes this fail."""
    assert record.kind in KIND_LIBRARY
    folder = folder_of(record)
    assert (PACKAGE / "methods" / folder / "__init__.py").is_file()
    assert (REPO / "model_cards" / f"{folder}.md").is_file(), "card prose"
    assert (REPO / "tests" / f"test_{folder}.py").is_file(), "mechanism tests"
    assert record.bibtex.startswith("@") and record.license and record.official_code.startswith("https://")
    assert record.paper_presets and record.paper_results
    config_class = record.load(record.config_class) if record.config_class else None
    if record.kind in TRAINED_KINDS:
        from hfpapers.engine import Recipe

        assert issubclass(record.load(record.recipe), Recipe)
        assert record.model_classes
        for dotted in record.model_classes.values():
            assert isinstance(record.load(dotted), type)
        if record.kind == "model":
            from transformers import PreTrainedConfig

            assert issubclass(config_class, PreTrainedConfig) and config_class.model_type == record.model_type
    else:
        from hfpapers.runs import Runner

        runner = record.load(record.runner)
        assert issubclass(runner, Runner) and runner.config_class is config_class
        assert dataclasses.is_dataclass(config_class)
        assert record.base_method in {r.slug for r in RECORDS if r.kind in TRAINED_KINDS}


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_every_preset_builds(record):
    """Presets are `Preset`s; the tiny one builds for real, paper sizes on the meta device (no memory)."""
    assert all(isinstance(p, Preset) for p in record.presets.values())
    for name in record.presets:
        if record.kind in TRAINED_KINDS:
            with torch.device("meta") if name != record.default_preset else torch.device("cpu"):
                model = hfpapers.create_model(record.slug, preset=name)
            assert sum(p.numel() for p in model.parameters()) > 0
        else:
            config = record.load(record.config_class)(**record.preset(name))
            assert dataclasses.asdict(config)


@pytest.mark.parametrize("record", [r for r in RECORDS if r.kind == "diffusers"], ids=lambda r: r.slug)
def test_diffusers_models_save_and_reload_bit_for_bit(record, tmp_path):
    torch.manual_seed(0)
    model = hfpapers.create_model(record.slug, preset=record.default_preset)
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))
    loaded = type(model).from_pretrained(tmp_path)
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def _fake_training_run(record, folder: Path) -> None:
    """The files `hfpapers train` leaves, around a freshly built tiny model (a card needs no training)."""
    from hfpapers.engine import RESULTS_FILE, RUN_FILE

    model = hfpapers.create_model(record.slug, preset=record.default_preset)
    model.save_pretrained(folder)
    (folder / RUN_FILE).write_text(json.dumps({
        "method": record.slug, "preset": record.default_preset, "dataset": record.dataset,
        "dataset_kwargs": dict(record.dataset_kwargs), "columns": {}, "training_arguments": {"num_epochs": 1},
        "recipe": {}, "num_processes": 1}))
    (folder / RESULTS_FILE).write_text(json.dumps({
        "train_seconds": 1.0, "global_step": 1, "epochs": 1, "eval": {"score": 0.5}, "examples_per_process": [1],
        "num_parameters": sum(p.numel() for p in model.parameters())}))


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_card_renders_and_the_hub_parser_reads_it(record, tmp_path):
    if record.kind in TRAINED_KINDS:
        from hfpapers.cards import write_card

        _fake_training_run(record, tmp_path)
        path = write_card(tmp_path, repo_id="someone/model")
    else:
        from hfpapers.runs import RunResult, Table, write_results

        result = RunResult(summary="what was done", metrics={"score": 0.5},
                           tables=[Table("A table", ["a", "b"], [[1, 2]], "what it shows")], usage="load REPO")
        config = record.load(record.config_class)(**record.preset(record.default_preset))
        path = write_results(tmp_path, record.slug, result, config=config)
    card = ModelCard.load(path)
    assert card.data.license == record.license.lower()
    assert card.data.library_name == record.library
    assert card.data.pipeline_tag in HUB_TASKS, f"{card.data.pipeline_tag!r} is not a Hub task"
    assert all(f"arxiv:{i}" in card.data.tags for i in record.arxiv_ids)
    (result,) = [r for r in card.data.eval_results if r.metric_name == "score"]
    assert result.metric_value == 0.5
    assert record.bibtex.splitlines()[0] in card.text and "Reported in the paper" in card.text


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_lazy_exports_are_a_static_map_of_each_submodule_all(record):
    package = importlib.import_module(f"hfpapers.methods.{folder_of(record)}")
    exports = package.__getattr__.exports
    for submodule, names in exports.items():
        assert tuple(importlib.import_module(f"{package.__name__}.{submodule}").__all__) == tuple(names), submodule
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        package.NoSuchName


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file of the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) - node.level]) if node.level else ""
            name = ".".join(p for p in (base, node.module) if p)
            out.append((node.lineno, name))
    return out


def test_import_rules():
    """Methods never import each other; shipped files (configuration / modeling / pipeline / processing) never
    import the core; the core reaches methods only through the registry (DESIGN.md)."""
    broken = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        for line, name in _imports(path):
            if not name.startswith("hfpapers"):
                continue
            where = f"{path.relative_to(REPO)}:{line} imports {name}"
            if relative[0] == "methods" and len(relative) > 2:
                method = relative[1]
                if name.startswith("hfpapers.methods.") and name.split(".")[2] != method:
                    broken.append(where + " (another method)")
                if relative[2].startswith(("configuration_", "modeling_", "pipeline_", "processing_")) \
                        and not name.startswith(f"hfpapers.methods.{method}"):
                    broken.append(where + " (a shipped file importing the core)")
            elif relative[0] != "methods" and path.name != "registry.py" and name.startswith("hfpapers.methods"):
                broken.append(where + " (the core reaching a method outside the registry)")
    assert not broken, "\n".join(broken)


def _tiny_config(record):
    return record.load(record.config_class)(**record.preset("tiny")) if record.kind == "model" else None


BAD_INPUT_CASES = [(record, auto_name, i) for record in RECORDS if record.kind in ("model", "diffusers")
                   for auto_name in record.model_classes
                   for i in range(len(bad_inputs(record.task, _tiny_config(record))))]


@pytest.mark.parametrize(("record", "auto_name", "case"), BAD_INPUT_CASES,
                         ids=[f"{r.slug}-{a}-{i}" for r, a, i in BAD_INPUT_CASES])
def test_bad_inputs_are_one_clear_error(record, auto_name, case):
    """At least ten bad inputs per model class (a diffusers model: its `encode`), each refused with one ValueError
    saying what was expected."""
    torch.manual_seed(0)
    model = hfpapers.create_model(record.slug, preset="tiny", head=auto_name).eval()
    cases = bad_inputs(record.task, _tiny_config(record))
    assert len(cases) >= 10
    name, inputs, message = cases[case]
    with pytest.raises(ValueError, match=message), torch.no_grad():
        (model.encode if record.kind == "diffusers" else model)(**inputs)


MODEL_RECORDS = [r for r in RECORDS if r.kind == "model"]


@pytest.fixture(scope="module")
def saved_tiny_models(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for record in MODEL_RECORDS:
        folders[record.slug] = tmp_path_factory.mktemp(record.slug)
        hfpapers.create_model(record.slug, preset="tiny").save_pretrained(folders[record.slug])
    return folders


@pytest.mark.parametrize("record", MODEL_RECORDS, ids=lambda r: r.slug)
def test_a_folder_of_another_method_is_refused_before_anything_is_built(record, saved_tiny_models):
    """transformers only warns and builds a default-sized model (a 7B decoder for llm-embedding)."""
    model_class = record.load(record.model_classes[record.head_auto_class])
    for other, folder in saved_tiny_models.items():
        if other != record.slug:
            with pytest.raises(ValueError, match=rf"'hfp-{other}' config given to .*'{record.model_type}'"):
                model_class.from_pretrained(folder)


@pytest.mark.parametrize("record", MODEL_RECORDS, ids=lambda r: r.slug)
def test_loads_through_every_auto_class_where_hfpapers_cannot_be_imported(record, saved_tiny_models):
    """The saved folder's auto_map names every Auto class of the record (transformers writes only the saved one)."""
    import os
    import subprocess
    import sys

    expected = {auto: dotted.rpartition(".")[2] for auto, dotted in record.model_classes.items()}
    code = (f"import sys; sys.modules['hfpapers'] = None; import transformers\n"
            f"for auto, name in {expected!r}.items():\n"
            f"    model = getattr(transformers, auto).from_pretrained({str(saved_tiny_models[record.slug])!r}, "
            f"trust_remote_code=True)\n"
            f"    assert type(model).__name__ == name and type(model).__module__.startswith('transformers_modules'), "
            f"(auto, type(model))\n")
    folder = saved_tiny_models[record.slug]
    env = {**os.environ, "HF_HOME": str(folder.parent / f"hf-{record.slug}"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=folder.parent,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


RUN_RECORDS = [r for r in RECORDS if r.kind not in TRAINED_KINDS]
BAD_SETTING_CASES = [(record, i) for record in RUN_RECORDS for i in range(len(bad_settings(record.slug)))]


@pytest.mark.parametrize(("record", "case"), BAD_SETTING_CASES,
                         ids=[f"{r.slug}-{i}" for r, i in BAD_SETTING_CASES])
def test_bad_run_settings_are_one_clear_error(record, case):
    """At least ten settings a procedure or analysis refuses, each with one error, before anything runs."""
    from hfpapers.runs import resolve_config

    cases = bad_settings(record.slug)
    assert len(cases) >= 10
    name, settings, message = cases[case]
    with pytest.raises((ValueError, TypeError), match=message):
        resolve_config(record, None, settings)


def run_without_hfpapers(code: str, folder: Path) -> str:
    """The stdout of `code`, run in a fresh Python where `import hfpapers` fails (a user without it, loading a
    saved `folder`), offline and with its own Hugging Face cache."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(folder.parent / f"hf-{folder.name}"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['hfpapers'] = None\n" + code],
                         capture_output=True, text=True, env=env, cwd=folder.parent, stdin=subprocess.DEVNULL,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_model_of_a_hand_built_config_loads_through_automodel_where_hfpapers_cannot_be_imported(tmp_path):
    """transformers writes only the saved class into `auto_map`: a classifier built from its config class (not
    through a preset) saved without AutoModel, so plain AutoModel failed where hfpapers is absent."""
    headed = [r for r in MODEL_RECORDS if len(r.model_classes) > 1]
    assert {r.slug for r in headed} >= {"efficientvim", "scaling-mlp"}
    expected = {}
    for record in headed:
        model = record.load(record.model_classes[record.head_auto_class])(
            record.load(record.config_class)(**record.preset("tiny")))
        model.save_pretrained(tmp_path / record.slug)
        classes = {"AutoConfig": record.load(record.config_class),
                   **{auto: record.load(dotted) for auto, dotted in record.model_classes.items()}}
        assert json.loads((tmp_path / record.slug / "config.json").read_text())["auto_map"] == {
            auto: f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}" for auto, cls in classes.items()}
        expected[str(tmp_path / record.slug)] = classes["AutoModel"].__name__
    code = ("from transformers import AutoModel\n"
            f"for folder in {list(expected)!r}:\n"
            "    model = AutoModel.from_pretrained(folder, trust_remote_code=True)\n"
            "    print(type(model).__module__.split('.')[0], type(model).__name__)\n")
    assert run_without_hfpapers(code, tmp_path / "models").split("\n")[:-1] == [
        f"transformers_modules {name}" for name in expected.values()]
