"""Run transformers' and diffusers' own generic model tests against hfpapers' model classes.

The upstream test files are not part of this repository: they are copied at run time from the sources given on
the command line into a temporary folder, next to one small generated tester module per model class (tiny
presets, inputs from `hfpapers.testing.tiny`). pytest runs there, and a table per class is printed: passed /
failed / skipped, and for each failure the test's name and the first line of its error.

    python evaluation/generic_tests/run.py \
        --transformers-tests pypi \
        --diffusers-tests /path/to/diffusers.git@HEAD \
        --markdown results.md

A source is a folder holding `tests/` (a checkout or an unpacked sdist), a `.tar.gz` (path or http(s) URL;
GitHub's `archive/refs/tags/<tag>.tar.gz` works), `GITDIR@REV` (a bare or normal git directory and a revision),
or `pypi` (transformers only: the sdist of the installed version, through pip; it ships tests/ without the
helper modules below). Give `--transformers-tests` more than once to overlay sources: each file comes from the
first source that has it. Helper modules that no source holds get stand-ins, listed in the output:
`ExportTesterMixin` and `GenerationTesterMixin` as empty mixins (no export tests run; none of our classes
generates), `config_common_kwargs` as non-default values of every argument of the installed `PreTrainedConfig`.

The upstream tests need `parameterized`; when it is missing it is installed into the temporary folder (pip).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

TRANSFORMERS_FILES = ["tests/test_modeling_common.py", "tests/test_configuration_common.py"]
TRANSFORMERS_HELPERS = {  # imported by the files above; stand-ins when no source has them
    "tests/exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "tests/generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "tests/utils/test_configuration_utils.py": None,  # written from the installed PreTrainedConfig
}
DIFFUSERS_FILES = ["tests/testing_utils.py", "tests/models/testing_utils/"]

# Per method: which of our classes, and the model-tester attributes the generic tests read (from the tiny config).
TESTER_ATTRIBUTES = {
    "scaling-mlp": lambda c: {"num_hidden_layers": c.num_blocks, "hidden_size": c.hidden_size,
                              "image_size": c.image_size, "num_channels": c.num_channels},
    "efficientvim": lambda c: {"num_hidden_layers": len(c.depths), "hidden_size": c.embed_dim[-1],
                               "image_size": c.image_size, "num_channels": c.num_channels},
    "llm-embedding": lambda c: {"num_hidden_layers": c.decoder_config.num_hidden_layers,
                                "hidden_size": c.decoder_config.hidden_size,
                                "num_attention_heads": c.decoder_config.num_attention_heads,
                                "vocab_size": c.decoder_config.vocab_size},
    "read": lambda c: {"num_hidden_layers": c.llava_config.text_config.num_hidden_layers,
                       "hidden_size": c.llava_config.text_config.hidden_size,
                       "num_attention_heads": c.llava_config.text_config.num_attention_heads,
                       "vocab_size": c.llava_config.text_config.vocab_size},
}
TEXT_TASKS = {"sentence-embedding", "reasoning-segmentation"}
# what upstream vision testers ask of a config instead of hidden_size / num_attention_heads / num_hidden_layers
VISION_CONFIG_PROPERTIES = ["num_channels", "image_size"]


def materialize(source: str, workdir: Path, package: str) -> tuple[Path, str]:
    """A local folder holding `tests/` for `source`, and a line saying where it came from."""
    if source == "pypi":
        if package != "transformers":
            raise SystemExit(f"`pypi` is a source for transformers only: the {package} sdist ships no model tests")
        import transformers

        version = transformers.__version__
        download = workdir / "sdist"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"transformers=={version}", "-d", str(download)], check=True)
        archive = next(download.glob("transformers-*.tar.gz"))
        return unpack(archive, workdir / "pypi"), f"PyPI sdist {archive.name}"
    if source.startswith(("http://", "https://")):
        archive = workdir / "download.tar.gz"
        urllib.request.urlretrieve(source, archive)
        return unpack(archive, workdir / "url"), source
    if re.search(r"\.(tar\.gz|tgz)$", source):
        return unpack(Path(source), workdir / Path(source).name.split(".")[0]), source
    gitdir, _, rev = source.partition("@")
    if rev or Path(gitdir, "HEAD").is_file():
        rev = rev or "HEAD"
        commit = subprocess.run(["git", "--git-dir", gitdir, "rev-parse", f"{rev}^{{commit}}"], check=True,
                                capture_output=True, text=True).stdout.strip()
        out = workdir / f"git-{commit[:12]}"
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "--git-dir", gitdir, "archive", "--format=tar", commit, "tests"],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(out, filter="data")
        return out, f"git {gitdir} {rev} = commit {commit}"
    folder = Path(source)
    if folder.name == "tests" and not (folder / "tests").is_dir():
        folder = folder.parent
    if not (folder / "tests").is_dir():
        raise SystemExit(f"{source}: expected a folder holding tests/, a .tar.gz, GITDIR@REV or `pypi`")
    return folder, f"folder {folder}"


def unpack(archive: Path, out: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    roots = [p for p in out.iterdir() if (p / "tests").is_dir()]
    if len(roots) != 1:
        raise SystemExit(f"{archive}: expected one top folder holding tests/, found {[p.name for p in roots]}")
    return roots[0]


def copy_upstream(sources: list[Path], files: list[str], root: Path, optional: dict[str, str | None]) -> list[str]:
    """Copy each file (or folder, ending in /) from the first source that has it; returns the stand-ins used."""
    standins = []
    for rel in [*files, *optional]:
        found = next((s / rel for s in sources if (s / rel).exists()), None)
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if found is None and rel not in optional:
            raise SystemExit(f"no source holds {rel}")
        if found is None:
            target.write_text(optional[rel] if optional[rel] is not None else config_common_kwargs_standin())
            standins.append(rel)
        elif found.is_dir():
            shutil.copytree(found, target)
        else:
            shutil.copy(found, target)
    for folder in [root / "tests", *(p for p in (root / "tests").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return standins


def config_common_kwargs_standin() -> str:
    """Non-default values for every argument of the installed PreTrainedConfig (what ConfigTester sets)."""
    from transformers import PreTrainedConfig

    values = {"return_dict": False, "output_hidden_states": True, "output_attentions": True, "dtype": "float16",
              "chunk_size_feed_forward": 5, "architectures": ["BertModel"], "id2label": {0: "label"},
              "label2id": {"label": "0"}, "problem_type": "regression"}
    accepted = set(inspect.signature(PreTrainedConfig.__init__).parameters) | {"output_attentions"}
    kept = {k: v for k, v in values.items() if k in accepted}
    return f"config_common_kwargs = {kept!r}\n"


TRANSFORMERS_MODULE = '''\
"""Generated: transformers' ModelTesterMixin + ConfigTester on {cls} ({slug}, tiny preset)."""
import copy
import unittest

import hfpapers
from hfpapers.testing.tiny import tiny_inputs
from transformers.models.auto import modeling_auto

from ..test_configuration_common import ConfigTester
from ..test_modeling_common import ModelTesterMixin

SLUG, HEAD = {slug!r}, {head!r}
# a fresh config, as upstream testers build theirs: no attention backend chosen yet (a model picks one)
TEMPLATE = hfpapers.get_method(SLUG).resolve("tiny", None, HEAD).new_config()
MODEL_CLASS = hfpapers.get_method(SLUG).load({class_path!r})
CONFIG_CLASS = hfpapers.get_method(SLUG).load({config_path!r})
# a built-in model is listed by name in the Auto mapping of its head, which the generic tests read
# (e.g. to add labels); a registered class is not, so list it here as a built-in one would be
getattr(modeling_auto, {mapping!r})[TEMPLATE.model_type] = MODEL_CLASS.__name__


class ModelTester:
    batch_size = 3
    is_training = True

    def __init__(self, parent):
        self.parent = parent
        for name, value in {attributes!r}.items():
            setattr(self, name, value)
        self.task = {task!r}
        if self.task in {text_tasks!r}:
            self.seq_length = tiny_inputs(self.task, TEMPLATE, self.batch_size)["input_ids"].shape[1]

    def get_config(self):
        return copy.deepcopy(TEMPLATE)

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), tiny_inputs(self.task, TEMPLATE, batch_size=self.batch_size)


class {test_name}(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MODEL_CLASS,)
    has_attentions = {has_attentions!r}
    test_resize_embeddings = {text!r}

    def setUp(self):
        self.model_tester = ModelTester(self)
        kwargs = {{}} if CONFIG_CLASS.sub_configs else {preset_config!r}
        self.config_tester = ConfigTester(self, config_class=CONFIG_CLASS, has_text_modality=False,
                                          common_properties={common_properties!r}, **kwargs)

    def test_config(self):
        self.config_tester.run_common_tests()
'''

DIFFUSERS_MODULE = '''\
"""Generated: diffusers' ModelTesterMixin + TrainingTesterMixin on {cls} ({slug}, tiny preset)."""
import torch

from hfpapers import get_method

from ..models.testing_utils import BaseModelTesterConfig, ModelTesterMixin, TrainingTesterMixin
from ..testing_utils import torch_device

RECORD = get_method({slug!r})
PRESET = RECORD.presets["tiny"].config
MODEL_CLASS = RECORD.load({class_path!r})
INPUTS = {inputs}


class {test_name}(BaseModelTesterConfig, ModelTesterMixin, TrainingTesterMixin):
    @property
    def model_class(self):
        return MODEL_CLASS

    @property
    def output_shape(self):
        return {output_shape}

    def get_init_dict(self):
        return {init}

    def get_dummy_inputs(self):
        generator = torch.Generator().manual_seed(0)
        return {{name: make(generator).to(torch_device) for name, make in INPUTS.items()}}
'''

# Our diffusers model classes: init dict from the tiny preset, output shape per sample, seeded inputs (32 px).
DIFFUSERS_CLASSES = {
    "LatentTransparencyEncoder": ('dict(PRESET["transparent_encoder"])', (4, 4, 4),
                                  '{"rgba": lambda g: torch.rand(2, 4, 32, 32, generator=g)}'),
    "TransparentVAEDecoder": ('dict(PRESET["transparent_decoder"])', (4, 32, 32),
                              '{"pixel": lambda g: torch.rand(2, 3, 32, 32, generator=g), '
                              '"latent": lambda g: torch.randn(2, 4, 4, 4, generator=g)}'),
    "TransparentVAE": ('{"vae": __import__("diffusers").AutoencoderKL.from_config(PRESET["vae"]), '
                       '"transparent_decoder": RECORD.load(MODEL_CLASS.__module__ + ".TransparentVAEDecoder")'
                       '.from_config(PRESET["transparent_decoder"]), '
                       '"transparent_encoder": RECORD.load(MODEL_CLASS.__module__ + ".LatentTransparencyEncoder")'
                       '.from_config(PRESET["transparent_encoder"])}', (4, 32, 32),
                       '{"rgba": lambda g: torch.rand(2, 4, 32, 32, generator=g)}'),
}

MAPPINGS = {"AutoModel": "MODEL_MAPPING_NAMES",
            "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"}


def write_transformers_testers(root: Path, only: str | None) -> dict[str, str]:
    import hfpapers

    folder = root / "tests" / "hfp"
    folder.mkdir()
    (folder / "__init__.py").touch()
    names = {}
    for record in hfpapers.list_methods():
        if record.kind != "model":
            continue
        for head, class_path in record.model_classes.items():
            cls = class_path.rsplit(".", 1)[1]
            if only and only not in cls:
                continue
            config = hfpapers.create_model(record.slug, preset="tiny", head=head).config
            test_name = f"{cls}GenericTest"
            (folder / f"test_{cls.lower()}.py").write_text(TRANSFORMERS_MODULE.format(
                cls=cls, slug=record.slug, head=head, class_path=class_path, config_path=record.config_class,
                mapping=MAPPINGS[head], attributes=TESTER_ATTRIBUTES[record.slug](config), task=record.task,
                text_tasks=TEXT_TASKS, test_name=test_name, has_attentions=record.task in TEXT_TASKS,
                text=record.task in TEXT_TASKS, preset_config=dict(record.presets["tiny"].config),
                common_properties=None if record.task in TEXT_TASKS else VISION_CONFIG_PROPERTIES))
            names[test_name] = cls
    return names


def write_diffusers_testers(root: Path, only: str | None) -> dict[str, str]:
    import hfpapers

    folder = root / "tests" / "hfp"
    folder.mkdir()
    (folder / "__init__.py").touch()
    names = {}
    for record in hfpapers.list_methods():
        if record.kind != "diffusers":
            continue
        module = next(iter(record.model_classes.values())).rsplit(".", 1)[0]
        for cls, (init, output_shape, inputs) in DIFFUSERS_CLASSES.items():
            if only and only not in cls:
                continue
            test_name = f"Test{cls}Generic"
            (folder / f"test_{cls.lower()}.py").write_text(DIFFUSERS_MODULE.format(
                cls=cls, slug=record.slug, class_path=f"{module}.{cls}", test_name=test_name, init=init,
                output_shape=output_shape, inputs=inputs))
            names[test_name] = cls
    return names


def run_pytest(root: Path, deps: Path, report: Path, pytest_args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(deps), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore",
                    f"--rootdir={root}", f"--junitxml={report}", "tests/hfp", *pytest_args], cwd=root, env=env)


def read_report(report: Path, names: dict[str, str]) -> dict[str, dict]:
    """Per model class: counts and (test, one-line reason) for each failure."""
    results: dict[str, dict] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0, "failures": []})
    for case in ET.parse(report).getroot().iter("testcase"):
        test_class = case.get("classname", "").rsplit(".", 1)[-1]
        cls = names.get(test_class, test_class)
        problem = next((c for c in case if c.tag in ("failure", "error")), None)
        if problem is not None:
            results[cls]["failed"] += 1
            results[cls]["failures"].append((case.get("name"), one_line(problem)))
        elif case.find("skipped") is not None:
            results[cls]["skipped"] += 1
        else:
            results[cls]["passed"] += 1
    return results


def one_line(problem) -> str:
    """The first line of the error pytest reports ("TypeError: ...")."""
    lines = [line.strip() for line in (problem.get("message") or problem.text or "").splitlines() if line.strip()]
    line = lines[0] if lines else "(no message)"
    return line if len(line) <= 200 else line[:197] + "..."


def table(title: str, results: dict[str, dict]) -> str:
    out = [f"### {title}", "", "| class | passed | failed | skipped |", "|---|---|---|---|"]
    for cls, r in sorted(results.items()):
        out.append(f"| `{cls}` | {r['passed']} | {r['failed']} | {r['skipped']} |")
    for cls, r in sorted(results.items()):
        if r["failures"]:
            out += ["", f"Failures of `{cls}`:", ""]
            out += [f"- `{name}`: {reason.replace('|', '/')}" for name, reason in sorted(r["failures"])]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformers-tests", action="append", default=[],
                        help="source of transformers' tests/ (repeatable; see the module docstring)")
    parser.add_argument("--diffusers-tests", action="append", default=[], help="source of diffusers' tests/")
    parser.add_argument("--only", help="only model classes whose name contains this")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it, instead of a temporary one")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --, e.g. -- -k save")
    args = parser.parse_args()
    if not args.transformers_tests and not args.diffusers_tests:
        parser.error("give --transformers-tests and/or --diffusers-tests")

    import diffusers
    import transformers

    work = args.keep or Path(tempfile.mkdtemp(prefix="generic-tests-"))
    work.mkdir(parents=True, exist_ok=True)
    deps = work / "deps"
    try:
        __import__("parameterized")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "parameterized"],
                       check=True)
    sections = []
    suites = [("transformers", transformers.__version__, args.transformers_tests, TRANSFORMERS_FILES,
               TRANSFORMERS_HELPERS, write_transformers_testers),
              ("diffusers", diffusers.__version__, args.diffusers_tests, DIFFUSERS_FILES, {},
               write_diffusers_testers)]
    for package, version, sources, files, helpers, write in suites:
        if not sources:
            continue
        found = [materialize(s, work / f"{package}-src", package) for s in sources]
        root = work / package
        standins = copy_upstream([folder for folder, _ in found], files, root, helpers)
        names = write(root, args.only)
        report = work / f"{package}.xml"
        run_pytest(root, deps, report, args.pytest_args)
        title = f"{package} {version} generic tests"
        notes = [f"- tests from {where}" for _, where in found]
        notes += [f"- stand-in for {rel} (no source had it)" for rel in standins]
        sections.append(table(title, read_report(report, names)) + "\n\n" + "\n".join(notes))
    text = "\n\n".join(sections)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
