"""One record per paper, and the single place where methods are registered with transformers.

Records are plain data (no torch import), so `import hfpapers` and `hfpapers list` stay fast. The
classes a record names are imported only when transformers' Auto machinery is imported (see
`_install_registration_hook`) or when a model is created.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import pkgutil
import sys
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

# The Auto class whose head serves each standard pipeline task.
TASK_AUTO_CLASS = {"image-classification": "AutoModelForImageClassification", "feature-extraction": "AutoModel"}

__all__ = ["MethodRecord", "list_methods", "get_method", "create_model", "register_with_transformers",
           "register_record"]


@dataclass(frozen=True)
class MethodRecord:
    """What hfpapers knows about one paper. Class fields are dotted paths, imported on demand."""

    slug: str
    title: str
    arxiv_id: str
    authors: str
    year: int
    task: str  # a transformers pipeline task, e.g. "image-classification"
    config_class: str | None  # transformers methods: the config class (diffusers models carry their own config)
    # transformers: Auto class name -> dotted path of the model class; diffusers: class name -> dotted path of a
    # model that builds itself with `from_configs(**preset values)` and loads with `from_pretrained`
    model_classes: Mapping[str, str]
    presets: Mapping[str, Mapping[str, Any]]  # preset name -> config values
    default_preset: str  # trained by `hfpapers zoo build`
    paper_presets: tuple[str, ...]  # the sizes the paper reports
    dataset: str  # embedded dataset that the default preset trains on (hfpapers.data)
    dataset_kwargs: Mapping[str, Any]
    recipe: str  # dotted path of the method's Recipe class
    official_code: str
    license: str  # license of the method's code
    weights_license: str  # license of the official weights
    bibtex: str
    time_budget_s: int  # wall-clock budget of the default preset in `hfpapers zoo build`
    processor: str | None = None  # dotted path of a function config -> image processor or tokenizer
    processor_class: str | None = None  # dotted path of the method's own ProcessorMixin, registered with AutoProcessor
    pipeline_class: str | None = None  # a transformers Pipeline for `task`, where no standard pipeline fits
    status: str = "complete"
    library: str = "transformers"  # or "diffusers": no Auto classes to register; components load by module path
    paper_results: Mapping[str, str] = field(default_factory=dict)  # what the paper reports, for the card

    @property
    def model_type(self) -> str:
        return f"hfp-{self.slug}"

    @property
    def head_auto_class(self) -> str:
        """The Auto class of the model that serves `task` (the default of `create_model`)."""
        if self.task in TASK_AUTO_CLASS:
            return TASK_AUTO_CLASS[self.task]
        return next((name for name in self.model_classes if name != "AutoModel"), "AutoModel")

    @property
    def arxiv_url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv_id}"

    def preset(self, name: str) -> dict[str, Any]:
        if name not in self.presets:
            raise KeyError(f"unknown preset {name!r} for {self.slug!r}; known presets: {', '.join(self.presets)}")
        return dict(self.presets[name])

    def load(self, dotted: str) -> Any:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def summary(self) -> dict[str, Any]:
        """The record as a JSON-friendly dict (what `hfpapers info` prints)."""
        return {
            "slug": self.slug,
            "title": self.title,
            "arxiv_id": self.arxiv_id,
            "task": self.task,
            "library": self.library,
            "model_type": self.model_type,
            "presets": list(self.presets),
            "default_preset": self.default_preset,
            "paper_presets": list(self.paper_presets),
            "dataset": self.dataset,
            "status": self.status,
            "official_code": self.official_code,
            "license": self.license,
        }


def lazy_exports(package: str, submodules: tuple[str, ...]):
    """A module `__getattr__` for a method package: its public classes load from `submodules` on first access,
    so the package (and its record) imports without torch."""

    def __getattr__(name):
        for submodule in submodules:
            module = importlib.import_module(f"{package}.{submodule}")
            if name in module.__all__:
                return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def _discover() -> dict[str, MethodRecord]:
    """Every `hfpapers.methods.<name>` package that defines `RECORD` is a method."""
    from . import methods

    records = {}
    for info in pkgutil.iter_modules(methods.__path__):
        record = getattr(importlib.import_module(f"{methods.__name__}.{info.name}"), "RECORD", None)
        if isinstance(record, MethodRecord):
            records[record.slug] = record
    return dict(sorted(records.items()))


_RECORDS: Mapping[str, MethodRecord] | None = None


def _records() -> Mapping[str, MethodRecord]:
    global _RECORDS
    if _RECORDS is None:
        _RECORDS = MappingProxyType(_discover())
    return _RECORDS


def list_methods() -> list[MethodRecord]:
    return list(_records().values())


def get_method(slug: str) -> MethodRecord:
    records = _records()
    if slug not in records:
        raise KeyError(f"unknown method {slug!r}; known methods: {', '.join(records)}")
    return records[slug]


def method_for_model_type(model_type: str | None) -> MethodRecord:
    """The record whose models have `model_type` ("hfp-<slug>")."""
    for record in list_methods():
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
    values = record.preset(preset or record.default_preset)
    values.update(overrides)
    head = head or record.head_auto_class
    if head not in record.model_classes:
        raise KeyError(f"{slug!r} has no {head!r}; available: {', '.join(record.model_classes)}")
    if record.library == "diffusers":
        return record.load(record.model_classes[head]).from_configs(**values)
    return record.load(record.model_classes[head])(record.load(record.config_class)(**values))


def load_pretrained(record: MethodRecord, folder: str):
    """A saved model of `record` from a folder or Hub repo, through the class that serves its task."""
    if record.library == "diffusers":
        return record.load(record.model_classes[record.head_auto_class]).from_pretrained(folder)
    register_with_transformers()
    import transformers

    return getattr(transformers, record.head_auto_class).from_pretrained(folder)


def create_processor(slug: str, config):
    """The method's processor (image processor or tokenizer) for `config` (None for methods without one)."""
    record = get_method(slug)
    if record.processor is None:
        return None
    return record.load(record.processor)(config)


_registered = False
_lock = threading.RLock()


def register_with_transformers() -> None:
    """Register every record's classes with the transformers Auto classes (idempotent).

    Also marks them for `auto_map`, so `save_pretrained` writes the modeling files next to the weights
    and the checkpoint loads with `trust_remote_code=True` where hfpapers is not installed.
    """
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
        for record in list_methods():
            register_record(record)


def register_record(record: MethodRecord) -> None:
    """Register one record's config, model classes and custom pipeline with transformers (idempotent).

    diffusers has no registry: its pipelines load our components by the module path in `model_index.json`."""
    if record.library != "transformers":
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
        transformers.AutoProcessor.register(config_class, processor_class, exist_ok=True)
        processor_class.register_for_auto_class()
    if record.pipeline_class:
        from transformers.pipelines import PIPELINE_REGISTRY

        PIPELINE_REGISTRY.register_pipeline(
            record.task, pipeline_class=record.load(record.pipeline_class),
            pt_model=getattr(transformers, record.head_auto_class),
        )


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
        watched = fullname in _TRIGGERS or fullname.startswith(_METHODS_PREFIX)
        if not watched or fullname in self._pending:
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
_deferred = False  # a trigger fired while a module that registration reads was still importing


def _register_when_idle(just_imported: str) -> None:
    # A trigger may finish while another transformers module, or one of our method modules, is still
    # half-imported (e.g. `pipelines` importing `modeling_auto`, or a method's configuration importing
    # `AutoConfig`); registering then could read that module half-done, so wait for the last one to finish.
    # (`just_imported` itself is still flagged as initialising until its loader returns.)
    global _deferred
    busy = any(
        name.startswith(("transformers", _METHODS_PREFIX))
        and name != just_imported
        and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )
    _deferred = busy
    if not busy:
        register_with_transformers()


def _install_registration_hook() -> None:
    if any(name in sys.modules for name in _TRIGGERS):
        register_with_transformers()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
