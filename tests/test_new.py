"""`hfpapers new`: a draft of each kind, written from the templates, imports, stays out of the listing and the
registration, and fails its own mechanism test until it is written; bad requests write nothing; no draft lands."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

import hfpapers
from hfpapers.cli import main

REPO = Path(__file__).resolve().parent.parent
# What each kind must get (README, "Adding a method"), written out by hand; {f} is the method's folder.
KIND_FILES = {
    "model": ["__init__.py", "configuration_{f}.py", "modeling_{f}.py", "recipe.py"],
    "diffusers": ["__init__.py", "modeling_{f}.py", "recipe.py"],
    "adapter": ["__init__.py", "adapters.py", "recipe.py"],
    "procedure": ["__init__.py", "config.py", "runner.py"],
    "analysis": ["__init__.py", "config.py", "runner.py"],
}
COMMON_FILES = ["model_cards/{f}.md", "tests/test_{f}.py", "evaluation/reproduce/{f}.py"]


def slug_of(kind: str) -> str:
    return f"new-{kind}-2"


def expected_files(kind: str) -> set[str]:
    folder = slug_of(kind).replace("-", "_")
    return {f"hfpapers/methods/{folder}/{name.format(f=folder)}" for name in KIND_FILES[kind]} | {
        name.format(f=folder) for name in COMMON_FILES}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the package with a draft of every kind written into it by `hfpapers new --root`."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "hfpapers", root / "hfpapers", ignore=shutil.ignore_patterns("__pycache__"))
    for kind in KIND_FILES:
        assert main(["new", slug_of(kind), "--kind", kind, "--title", f"A {kind} paper", "--arxiv", "2401.00001",
                     "--root", str(root)]) == 0
    return root


def run_in(tree: Path, *args: str) -> subprocess.CompletedProcess:
    """Python with the copied tree first on sys.path (not the repository's package)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tree, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("kind", KIND_FILES)
def test_new_writes_the_files_of_its_kind_as_a_draft(kind, tree):
    folder = slug_of(kind).replace("-", "_")
    written = {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file() and folder in str(p)}
    assert written == expected_files(kind)
    record = (tree / "hfpapers" / "methods" / folder / "__init__.py").read_text()
    assert f'slug="{slug_of(kind)}"' in record and f'kind="{kind}"' in record and 'status="draft"' in record
    assert 'title="A ' + kind + ' paper"' in record and 'arxiv_id="2401.00001"' in record
    for path in written:
        text = (tree / path).read_text()
        assert "{{" not in text, f"{path} has an unfilled template field"
        if path.endswith(".py"):
            compile(text, path, "exec")
    if kind == "model":
        configuration = (tree / "hfpapers" / "methods" / folder / f"configuration_{folder}.py").read_text()
        assert f'model_type = "hfp-{slug_of(kind)}"' in configuration
    card = (tree / "model_cards" / f"{folder}.md").read_text()
    assert [line for line in card.splitlines() if line.startswith("## ")] == [
        "## Summary", "## Intended use", "## Limitations"]


def test_drafts_import_but_are_neither_listed_nor_registered(tree):
    """Every generated module imports (torch once for all kinds); the drafts are found but not listed, and
    registration with transformers leaves them out; `hfpapers list` still works."""
    modules = [".".join(p.relative_to(tree).with_suffix("").parts)
               for p in sorted((tree / "hfpapers" / "methods").glob("new_*/*.py")) if p.name != "__init__.py"]
    assert len(modules) == sum(len(files) - 1 for files in KIND_FILES.values())
    code = ("import importlib, json, sys, hfpapers; from hfpapers.registry import _registered;"
            "[importlib.import_module(m) for m in sys.argv[1:]]; hfpapers.register_with_transformers();"
            "print(json.dumps({'file': hfpapers.__file__, 'listed': [r.slug for r in hfpapers.list_methods()],"
            "'all': {r.slug: [r.kind, r.status] for r in hfpapers.list_methods(include_drafts=True)},"
            "'registered': sorted(_registered)}))")
    out = run_in(tree, "-c", code, *modules)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.splitlines()[-1])
    assert found["file"] == str(tree / "hfpapers" / "__init__.py")
    drafts = {slug_of(kind): [kind, "draft"] for kind in KIND_FILES}
    assert {slug: found["all"][slug] for slug in drafts} == drafts
    assert not set(drafts) & set(found["listed"]) and "scaling-mlp" in found["listed"]
    assert not set(drafts) & set(found["registered"]) and "scaling-mlp" in found["registered"]
    listing = run_in(tree, "-m", "hfpapers.cli", "list")
    assert listing.returncode == 0, listing.stderr
    assert "scaling-mlp" in listing.stdout and "new-" not in listing.stdout


def test_the_generated_mechanism_tests_fail_until_written(tree):
    """A generated test must never pass vacuously."""
    tests = [str(tree / "tests" / f"test_{slug_of(kind).replace('-', '_')}.py") for kind in KIND_FILES]
    out = run_in(tree, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tree), *tests)
    assert out.returncode == 1 and f"{len(tests)} failed" in out.stdout and "passed" not in out.stdout, out.stdout


@pytest.fixture
def small_repo(tmp_path) -> Path:
    """A repository root with one method, enough for `hfpapers new`'s checks (it imports nothing from it)."""
    method = tmp_path / "hfpapers" / "methods" / "scaling_mlp"
    method.mkdir(parents=True)
    (method / "__init__.py").write_text('RECORD = MethodRecord(\n    slug="scaling-mlp",\n)\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_taken.py").write_text("")
    return tmp_path


REFUSED = {
    "upper case": (["Scaling-MLP"], "slug must be lowercase"),
    "underscore": (["my_method"], "slug must be lowercase"),
    "leading digit": (["3d-gs"], "starting with a letter"),
    "double hyphen": (["my--method"], "single hyphens"),
    "slug in use": (["scaling-mlp"], "slug 'scaling-mlp' is already used by hfpapers/methods/scaling_mlp/"),
    "test file exists": (["taken"], "already exist (nothing was written): tests/test_taken.py"),
    "bad arxiv id": (["fresh", "--arxiv", "arXiv:2401.1"], "--arxiv expects a new-style arXiv id"),
    "title with a quote": (["fresh", "--title", 'a "quoted" title'], "--title must be one non-empty line"),
}


@pytest.mark.parametrize("argv, message", REFUSED.values(), ids=REFUSED.keys())
def test_bad_requests_are_one_line_and_write_nothing(argv, message, small_repo, capsys):
    before = snapshot(small_repo)
    assert main(["new", *argv, "--kind", "model", "--root", str(small_repo)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("hfpapers new: error: ") and message in error
    assert snapshot(small_repo) == before


def test_a_folder_in_use_and_a_root_that_is_no_repository_are_refused(small_repo, tmp_path_factory, capsys):
    (small_repo / "hfpapers" / "methods" / "half_done").mkdir()  # a folder without a record yet
    assert main(["new", "half-done", "--kind", "analysis", "--root", str(small_repo)]) == 1
    assert "hfpapers/methods/half_done/ already exists" in capsys.readouterr().err
    assert main(["new", "fresh", "--kind", "model", "--root", str(tmp_path_factory.mktemp("empty"))]) == 1
    assert "is not an hfpapers repository (no hfpapers/methods/)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        main(["new", "fresh", "--kind", "dataset", "--root", str(small_repo)])
    assert exit_.value.code == 2


def test_templates_ship_in_the_wheel():
    """Every template matches the package-data globs of pyproject.toml (tests/test_wheel.py builds the wheel)."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hfpapers"]
    templates = [p.relative_to(REPO / "hfpapers").as_posix() for p in (REPO / "hfpapers" / "templates").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
    assert len(templates) == sum(len(files) for files in KIND_FILES.values()) + len(COMMON_FILES)
    assert all(any(fnmatch(t, g) for g in globs) for t in templates)


def test_no_draft_lands_in_the_repository():
    """A draft is a method being written: it never reaches the repository's own methods."""
    drafts = [r.slug for r in hfpapers.list_methods(include_drafts=True) if r.status == "draft"]
    assert drafts == []
    assert hfpapers.list_methods() == hfpapers.list_methods(include_drafts=True)


def test_a_record_status_is_complete_or_draft():
    record = hfpapers.get_method("scaling-mlp")
    assert dataclasses.replace(record, status="draft").status == "draft"
    with pytest.raises(ValueError, match="status 'wip' is not one of complete, draft"):
        dataclasses.replace(record, status="wip")
