"""One record per paper, and the single place where methods are registered with transformers.

Records are plain data (no torch import), so `import hfpapers` and `hfpapers list` stay fast. The
classes a record names are imported only when transformers' Auto machinery is imported (see
`_install_registration_hook`) or when a model is created.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import inspect
import os
import pkgutil
import sys
import threading
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

# The Auto class whose head serves each standard pipeline task.
TASK_AUTO_CLASS = {"image-classification": "AutoModelForImageClassification", "feature-extraction": "AutoModel"}

# What a record contributes (DESIGN.md, "Kinds of method") and the library its saved output loads with.
KIND_LIBRARY = {"model": "transformers", "diffusers": "diffusers", "adapter": "peft", "procedure": "transformers",
                "analysis": "transformers"}
# Kinds whose entry point is a `Recipe` trained by the engine (`hfpapers train`); the others run a
# `hfpapers.runs.Runner` (`hfpapers run`).
TRAINED_KINDS = ("model", "diffusers", "adapter")
# A "draft" record is a method being written (`hfpapers new` makes one): `get_method` finds it, so its developer
# can build and train it, but it is not listed, zoo-built or registered with transformers. A draft never lands.
STATUSES = ("complete", "draft")

__all__ = ["MethodRecord", "Preset", "ResolvedPreset", "list_methods", "get_method", "create_model", "register_with_transformers",
           "register_record", "RegistrationError"]


class RegistrationError(ImportError):
    """A method's classes could not be imported or registered; the message names the method."""


@dataclass(frozen=True)
class Preset:
    """One named size of a method: its config values and the training arguments that go with them.

    `config` holds model-config values (model kinds) or hyper-parameters (procedures, analyses); `training`
    holds `TrainingArguments` / recipe fields that this preset trains with (e.g. CPU-sized epochs for "tiny").
    """

    config: Mapping[str, Any]
    training: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

@dataclass(frozen=True)
class ResolvedPreset:
    """A preset resolved once, with the user's config overrides: what the engine hands a recipe's `build_model`.

    `values` are the config values (preset, then overrides); `new_config` / `new_model` build from them, with
    values the recipe derives (e.g. the labels of its dataset) under the user's overrides.
    """

    name: str
    values: Mapping[str, Any]
    overrides: Mapping[str, Any]
    training: Mapping[str, Any]
    config_class: type | None  # None for diffusers models, which carry their own configs
    model_class: type
    processor_factory: Any = None  # config -> image processor / tokenizer / processor, or None
    # every Auto class of the method -> "modeling_<x>.<Class>": a saved model then loads without hfpapers through
    # any of them (transformers itself writes only the saved class's entry)
    auto_map: Mapping[str, str] = field(default_factory=dict)

    def merged(self, **derived: Any) -> dict[str, Any]:
        return {**self.values, **derived, **self.overrides}

    def new_config(self, **derived: Any):
        from huggingface_hub.errors import StrictDataclassError

        try:
            config = self.config_class(**self.merged(**derived))
        except StrictDataclassError as error:  # a value the config's own checks refuse: one line, not a traceback
            raise ValueError(" ".join(str(error).split())) from error
        config.auto_map = dict(self.auto_map)
        return config

    def new_model(self, **derived: Any):
        if self.config_class is None:  # diffusers: the model builds its components from their configs
            return self.model_class.from_configs(**self.merged(**derived))
        return self.model_class(self.new_config(**derived))

    def new_processor(self, config):
        return None if self.processor_factory is None else self.processor_factory(config)


@dataclass(frozen=True)
class MethodRecord:
    """What hfpapers knows about one paper. Class fields are dotted paths, imported on demand."""

    slug: str
    title: str
    arxiv_id: str
    authors: str
    year: int
    task: str  # a transformers pipeline task, e.g. "image-classification" (for procedures: what the result serves)
    # model kinds: the transformers config class (diffusers models carry their own config); procedures and
    # analyses: the dataclass of their hyper-parameters
    config_class: str | None
    # transformers: Auto class name -> dotted path of the model class; diffusers: class name -> dotted path of a
    # model that builds itself with `from_configs(**preset values)` and loads with `from_pretrained`
    model_classes: Mapping[str, str]
    presets: Mapping[str, Preset]
    default_preset: str  # built by `hfpapers zoo build`
    paper_presets: tuple[str, ...]  # the sizes / settings the paper reports
    dataset: str  # embedded dataset that the default preset trains or runs on (hfpapers.data)
    dataset_kwargs: Mapping[str, Any]
    official_code: str
    license: str  # license of the method's code
    weights_license: str  # license of the official weights
    bibtex: str
    time_budget_s: int  # wall-clock budget of the default preset in `hfpapers zoo build`
    kind: str = "model"  # model | diffusers | adapter | procedure | analysis (see KIND_LIBRARY)
    recipe: str | None = None  # trained kinds: dotted path of the method's Recipe class
    runner: str | None = None  # procedures and analyses: dotted path of the method's `hfpapers.runs.Runner`
    base_method: str | None = None  # procedures and analyses: whose zoo model `hfpapers zoo build` runs them on
    extra_arxiv_ids: tuple[str, ...] = ()  # further papers of the same method (e.g. a journal extension)
    processor: str | None = None  # dotted path of a function config -> image processor or tokenizer
    # dotted path of the method's own ProcessorMixin (registered with AutoProcessor) or image processor (with
    # AutoImageProcessor)
    processor_class: str | None = None
    # a transformers Pipeline for `task`, where no standard pipeline fits; diffusers: its DiffusionPipeline for `task`
    # (every pipeline of that module is registered with diffusers)
    pipeline_class: str | None = None
    converter: str | None = None  # dotted path of the module whose `main(argv)` converts official checkpoints
    status: str = "complete"  # one of STATUSES
    paper_results: Mapping[str, str] = field(default_factory=dict)  # what the paper reports, for the card

    def __post_init__(self):
        problems = []
        if self.kind not in KIND_LIBRARY:
            problems.append(f"kind {self.kind!r} is not one of {', '.join(KIND_LIBRARY)}")
        if self.status not in STATUSES:
            problems.append(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.kind in TRAINED_KINDS and not self.recipe:
            problems.append(f"a {self.kind!r} record needs a recipe")
        if self.kind not in TRAINED_KINDS and not self.runner:
            problems.append(f"a {self.kind!r} record needs a runner")
        bad = [name for name, p in self.presets.items() if not isinstance(p, Preset)]
        if bad:
            problems.append(f"presets {bad} are not Preset objects")
        missing = [name for name in (self.default_preset, *self.paper_presets) if name not in self.presets]
        if missing:
            problems.append(f"presets {missing} are named but not defined")
        if problems:
            raise ValueError(f"method record {self.slug!r}: " + "; ".join(problems))

    @property
    def model_type(self) -> str:
        return f"hfp-{self.slug}"

    @property
    def library(self) -> str:
        """The library that loads what this method saves (the card's `library_name`)."""
        return KIND_LIBRARY[self.kind]

    @property
    def arxiv_ids(self) -> tuple[str, ...]:
        return (self.arxiv_id, *self.extra_arxiv_ids)

    @property
    def head_auto_class(self) -> str:
        """The Auto class of the model that serves `task` (the default of `create_model`)."""
        if self.task in TASK_AUTO_CLASS:
            return TASK_AUTO_CLASS[self.task]
        return next((name for name in self.model_classes if name != "AutoModel"), "AutoModel")

    @property
    def arxiv_url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv_id}"

    @property
    def entry_point(self) -> str:
        """What a user calls to use the method (the `hfpapers list` column)."""
        if self.kind in ("procedure", "analysis"):
            return f"hfpapers run {self.slug}"
        if self.kind == "diffusers":
            return next(iter(self.model_classes)) + ".from_pretrained"
        if self.pipeline_class or self.task not in TASK_AUTO_CLASS:
            return f'pipeline("{self.task}")'
        return f"{self.head_auto_class}"

    def preset(self, name: str) -> dict[str, Any]:
        """The config values of preset `name`."""
        return dict(self.get_preset(name).config)

    def resolve(self, name: str | None = None, config_overrides: Mapping[str, Any] | None = None,
                head: str | None = None) -> ResolvedPreset:
        """Preset `name` (default: the default preset) with `config_overrides`, and the classes that build it
        (`head`: the Auto class name, default the one serving the method's task)."""
        name = name or self.default_preset
        preset = self.get_preset(name)
        head = head or self.head_auto_class
        if head not in self.model_classes:
            raise KeyError(f"{self.slug!r} has no {head!r}; available: {', '.join(self.model_classes) or 'none'}")
        overrides = dict(config_overrides or {})
        config_class = self.load(self.config_class) if self.kind == "model" else None
        model_class = self.load(self.model_classes[head])
        # A misspelt value would otherwise be stored in config.json and do nothing.
        known = ({f.name for f in fields(config_class)} | {"num_labels"} if config_class is not None
                 else set(inspect.signature(model_class.from_configs).parameters))
        if unknown := sorted(set(overrides) - known):
            raise TypeError(f"unknown config values {unknown} for {self.slug!r}; its config takes: "
                            f"{', '.join(sorted(known))}")
        return ResolvedPreset(
            name=name, values={**preset.config, **overrides}, overrides=overrides, training=dict(preset.training),
            config_class=config_class, model_class=model_class,
            processor_factory=self.load(self.processor) if self.processor else None,
            auto_map=self.auto_map)

    @property
    def auto_map(self) -> dict[str, str]:
        """config.json's `auto_map` (model kinds): every Auto class -> "modeling_<x>.<Class>", so a saved model
        loads without hfpapers through any of them (transformers itself writes only the saved class's entry)."""
        if self.kind != "model":
            return {}
        return {auto: ".".join(dotted.split(".")[-2:]) for auto, dotted in
                {"AutoConfig": self.config_class, **self.model_classes}.items()}

    @property
    def custom_pipelines(self) -> dict[str, dict]:
        """config.json's `custom_pipelines` for the method's own pipeline, as `Pipeline.save_pretrained` writes it:
        `pipeline(task, model=folder, trust_remote_code=True)` then runs the folder's copy of the pipeline."""
        if not self.pipeline_class:
            return {}
        return {self.task: {"impl": ".".join(self.pipeline_class.split(".")[-2:]), "pt": [self.head_auto_class]}}

    def get_preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise KeyError(f"unknown preset {name!r} for {self.slug!r}; known presets: {', '.join(self.presets)}")
        return self.presets[name]

    def load(self, dotted: str) -> Any:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def summary(self) -> dict[str, Any]:
        """The record as a JSON-friendly dict (what `hfpapers list --json` prints)."""
        return {
            "slug": self.slug,
            "kind": self.kind,
            "title": self.title,
            "arxiv_id": self.arxiv_id,
            "arxiv_ids": list(self.arxiv_ids),
            "task": self.task,
            "library": self.library,
            "entry_point": self.entry_point,
            "model_type": self.model_type,
            "presets": list(self.presets),
            "default_preset": self.default_preset,
            "paper_presets": list(self.paper_presets),
            "dataset": self.dataset,
            "status": self.status,
            "official_code": self.official_code,
            "license": self.license,
        }


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]]):
    """A module `__getattr__` for a method package. `exports` is a static map {submodule: its public names}
    (each submodule's `__all__`; a contract test keeps them equal): a name's submodule is imported on first
    access, and only that one, so the package (and its record) imports without torch."""
    owner = {name: submodule for submodule, names in exports.items() for name in names}

    def __getattr__(name):
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{owner[name]}"), name)

    __getattr__.exports = MappingProxyType(dict(exports))
    return __getattr__


def _discover() -> dict[str, MethodRecord]:
    """Every `hfpapers.methods.<name>` package that defines `RECORD` is a method."""
    from . import methods

    records = {}
    for info in pkgutil.iter_modules(methods.__path__):
        try:
            package = importlib.import_module(f"{methods.__name__}.{info.name}")
        except Exception as error:
            raise RegistrationError(f"method package {info.name!r} failed to import: "
                                    f"{type(error).__name__}: {error}") from error
        record = getattr(package, "RECORD", None)
        if not isinstance(record, MethodRecord):
            raise RegistrationError(f"method package {info.name!r} defines no RECORD (every paper has one record)")
        if record.slug in records:
            raise RegistrationError(f"two method packages use the slug {record.slug!r}")
        records[record.slug] = record
    return dict(sorted(records.items()))


_RECORDS: Mapping[str, MethodRecord] | None = None


def _records() -> Mapping[str, MethodRecord]:
    global _RECORDS
    if _RECORDS is None:
        _RECORDS = MappingProxyType(_discover())
    return _RECORDS


def list_methods(include_drafts: bool = False) -> list[MethodRecord]:
    """The records of every method, sorted by slug; drafts (methods still being written) only when asked for."""
    return [r for r in _records().values() if include_drafts or r.status != "draft"]


def get_method(slug: str) -> MethodRecord:
    records = _records()
    if slug not in records:
        raise KeyError(f"unknown method {slug!r}; known methods: {', '.join(records)}")
    return records[slug]


def method_for_model_type(model_type: str | None) -> MethodRecord:
    """The record whose models have `model_type` ("hfp-<slug>")."""
    for record in list_methods(include_drafts=True):
        if record.model_type == model_type:
            return record
    raise KeyError(f"model_type {model_type!r} is not an hfpapers model; known: "
                   f"{', '.join(r.model_type for r in list_methods())}")


def create_model(slug: str, preset: str | None = None, *, head: str | None = None, **overrides: Any):
    """A randomly initialised model of `slug` at `preset` (default: the record's default preset).

    `head` picks the Auto class (default: the one for the method's task); `overrides` change config values.
    """
    record = get_method(slug)
    register_with_transformers()
    return record.resolve(preset, overrides, head).new_model()


def load_pretrained(record: MethodRecord, folder: str):
    """A saved model of `record` from a folder or Hub repo, through the class that serves its task."""
    if record.kind == "diffusers":
        return record.load(record.model_classes[record.head_auto_class]).from_pretrained(folder)
    register_with_transformers()
    import transformers

    try:  # safetensors only: a pickled checkpoint is never read
        model, info = getattr(transformers, record.head_auto_class).from_pretrained(
            folder, use_safetensors=True, output_loading_info=True)
    except OSError as error:
        raise ValueError(f"{folder}: no safetensors weights of a {record.slug!r} model to load "
                         f"({' '.join(str(error).split())[:200]})") from error
    # transformers fills missing weights with fresh ones and only warns: an evaluation of those would be noise
    if missing := [*info["missing_keys"], *info["mismatched_keys"]]:
        raise ValueError(f"{folder}: its weights do not fit the {record.slug!r} model (missing or mis-shaped: "
                         f"{sorted(map(str, missing))[:5]})")
    return model


def create_processor(slug: str, config):
    """The method's processor (image processor or tokenizer) for `config` (None for methods without one)."""
    record = get_method(slug)
    if record.processor is None:
        return None
    return record.load(record.processor)(config)


_registered: set[str] = set()  # slugs registered so far
_lock = threading.RLock()


def register_with_transformers() -> None:
    """Register every listed record's classes with the transformers Auto classes (idempotent; drafts are not
    registered, so a method still being written cannot break the others).

    Also marks them for `auto_map`, so `save_pretrained` writes the modeling files next to the weights
    and the checkpoint loads with `trust_remote_code=True` where hfpapers is not installed. A method whose
    classes fail to import does not keep the others from registering; the error names it afterwards (and
    the next call tries it again).
    """
    with _lock:
        failures = []
        for record in list_methods():
            if record.slug in _registered:
                continue
            # Marked first: registering can import a trigger (transformers.pipelines), whose hook calls back here
            # and would register this record a second time, inside the first.
            _registered.add(record.slug)
            try:
                register_record(record)
            except Exception as error:  # any import error of a method's module
                _registered.discard(record.slug)
                failures.append((record.slug, error))
        if failures:
            raise RegistrationError("; ".join(f"method {slug!r} could not be registered "
                                              f"({type(error).__name__}: {error})" for slug, error in failures)
                                    ) from failures[0][1]


def register_record(record: MethodRecord) -> None:
    """Register one record's config, model classes and custom pipeline with transformers (idempotent).

    Only model kinds have classes to register with transformers; a diffusers record's pipelines are made visible
    to diffusers (`_register_with_diffusers`), and procedures and analyses work on other methods' models."""
    if record.kind == "diffusers":
        _register_with_diffusers(record)
    if record.kind != "model":
        return
    import transformers

    config_class = record.load(record.config_class)
    transformers.AutoConfig.register(record.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_name, dotted in record.model_classes.items():
        model_class = record.load(dotted)
        getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_name)
    if record.processor_class:
        processor_class = record.load(record.processor_class)
        if issubclass(processor_class, transformers.ImageProcessingMixin):
            transformers.AutoImageProcessor.register(config_class, image_processor_classes={"pil": processor_class},
                                                     exist_ok=True)
        else:
            transformers.AutoProcessor.register(config_class, processor_class, exist_ok=True)
        processor_class.register_for_auto_class()
    if record.pipeline_class:
        from transformers.pipelines import PIPELINE_REGISTRY

        PIPELINE_REGISTRY.register_pipeline(
            record.task, pipeline_class=record.load(record.pipeline_class),
            pt_model=getattr(transformers, record.head_auto_class),
        )
        config_class.custom_pipelines = _CustomPipelines(record.task)
    _save_what_loads_without_hfpapers(config_class, record)


class _CustomPipelines:
    """`config.custom_pipelines` of a method whose pipeline hfpapers registers: stored and saved as any config
    value (config.json keeps it, so the folder's copy of the pipeline runs where hfpapers is absent), but read back
    without the task registered here. transformers' `pipeline()` looks at a config's custom tasks before its
    registry, and would demand `trust_remote_code=True` to run the folder's copy of the code installed here."""

    def __init__(self, task: str):
        self.task = task

    def __get__(self, config, owner=None):
        if config is None:
            return self
        return {task: info for task, info in config.__dict__.get("custom_pipelines", {}).items() if task != self.task}

    def __set__(self, config, value):
        config.__dict__["custom_pipelines"] = value


def _save_what_loads_without_hfpapers(config_class, record: MethodRecord) -> None:
    """Saving the config (which every `save_pretrained` of the model does) also writes every Auto class of the
    record into `auto_map` and, for a method with its own pipeline, `custom_pipelines` and the pipeline's code, as
    `Pipeline.save_pretrained` does; a config built by hand (not by a preset) then saves the same as one that is."""
    save = config_class.save_pretrained
    if getattr(save, "saves_for", None) == record.slug:
        return

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        self.auto_map = {**record.auto_map, **(getattr(self, "auto_map", None) or {})}
        if record.pipeline_class:
            from transformers.dynamic_module_utils import custom_object_save

            self.custom_pipelines = {**self.__dict__.get("custom_pipelines", {}), **record.custom_pipelines}
            os.makedirs(save_directory, exist_ok=True)
            custom_object_save(record.load(record.pipeline_class), save_directory)
        return save(self, save_directory, *args, **kwargs)

    save_pretrained.saves_for = record.slug
    config_class.save_pretrained = save_pretrained


# class name -> module of the diffusers pipelines registered so far (what `_diffusers_getattr` resolves)
_diffusers_pipelines: dict[str, str] = {}


def _register_with_diffusers(record: MethodRecord) -> None:
    """diffusers has no registry: `DiffusionPipeline.from_pretrained` looks the `_class_name` of `model_index.json`
    up among the `diffusers` package's attributes (and our components by the module path saved with them). The
    pipelines of the module of the record's `pipeline_class` become such attributes, so that a folder saved with
    plain `save_pretrained()` loads through `DiffusionPipeline` wherever hfpapers is imported. They resolve on first
    use, through the package's PEP 562 `__getattr__`: registration can run while diffusers is half-imported (peft
    imports transformers' Auto classes from inside it), when our pipelines could not be imported yet."""
    if not record.pipeline_class:
        return
    import diffusers

    module_name = record.pipeline_class.rpartition(".")[0]
    package, _, submodule = module_name.rpartition(".")
    # the method package's static map of exports names them without importing the module
    for name in importlib.import_module(package).__getattr__.exports[submodule]:
        _diffusers_pipelines[name] = module_name
    diffusers.__getattr__ = _diffusers_getattr


def _diffusers_getattr(name: str):
    """The `diffusers` package's module `__getattr__` (asked before diffusers' own lazy lookup): our pipelines."""
    import diffusers

    if name in _diffusers_pipelines:
        value = getattr(importlib.import_module(_diffusers_pipelines[name]), name)
        if isinstance(value, type) and issubclass(value, diffusers.DiffusionPipeline):
            setattr(diffusers, name, value)
            return value
    raise AttributeError(f"module 'diffusers' has no attribute {name!r}")


# Modules of transformers whose import means "the Auto machinery is about to be used".
_TRIGGERS = frozenset(
    {
        "transformers.models.auto.configuration_auto",
        "transformers.models.auto.modeling_auto",
        "transformers.models.auto.image_processing_auto",
        "transformers.pipelines",
    }
)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `register_with_transformers` once any trigger module has been imported.

    Importing our model classes needs torch (seconds); deferring registration to the moment transformers'
    Auto classes are imported keeps `import hfpapers` fast while `AutoModel*.from_pretrained` and
    `pipeline(...)` still see every method. Method modules are watched too: when one of them imports the
    Auto classes, registration waits until it has finished importing (it would otherwise read it half-done).
    """

    def __init__(self):
        self._pending: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if _hook_done or fullname in self._pending or not fullname.startswith(_WATCHED_PREFIXES):
            return None
        self._pending.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._pending.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            if fullname in _TRIGGERS or _deferred:
                _register_when_idle(just_imported=fullname)

        loader.exec_module = exec_module
        return spec


_METHODS_PREFIX = "hfpapers.methods."
# Modules watched until registration ran: a trigger can fire inside any of them (diffusers importing CLIP, which
# imports the Auto classes), and registration then waits for the last one still importing to finish.
_WATCHED_PREFIXES = ("transformers.", "diffusers.", _METHODS_PREFIX)
_deferred = False  # a trigger fired while a module that registration reads was still importing
_hook_done = False  # registration ran from the hook: stop watching imports


def _register_when_idle(just_imported: str) -> None:
    # A trigger may finish while another transformers module, or one of our method modules, is still
    # half-imported (e.g. `pipelines` importing `modeling_auto`, or a method's configuration importing
    # `AutoConfig`); registering then could read that module half-done, so wait for the last one to finish.
    # (`just_imported` itself is still flagged as initialising until its loader returns.)
    global _deferred, _hook_done
    busy = any(
        name.startswith(("transformers", "diffusers", _METHODS_PREFIX))
        and name != just_imported
        and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )
    _deferred = busy
    if not busy:
        _hook_done = True
        register_with_transformers()


def _install_registration_hook() -> None:
    if any(name in sys.modules for name in _TRIGGERS):
        register_with_transformers()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
