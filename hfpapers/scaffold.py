"""`hfpapers new <slug> --kind <kind>`: a new method's files, written from the templates of its kind.

The templates live in `hfpapers/templates/new/<kind>/` (one per kind) and `.../common/` (card prose, mechanism
test, reproduction script); their suffix is `.tmpl` so they are neither imported nor linted as code. `{{name}}`
marks a value filled in here. What they write is a *draft*: its record has `status="draft"`, so it is not listed,
zoo-built or registered until its developer finishes it (README, "Adding a method").
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from .registry import KIND_LIBRARY

__all__ = ["new_method", "targets"]

SLUG = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
ARXIV_ID = re.compile(r"\d{4}\.\d{4,5}")
TEMPLATES = files("hfpapers") / "templates" / "new"

# Per kind: template name -> path written, relative to the repository root ({folder} is the method's folder).
_METHOD = "hfpapers/methods/{folder}"
_COMMON = {"card.md.tmpl": "model_cards/{folder}.md", "test.py.tmpl": "tests/test_{folder}.py",
           "reproduce.py.tmpl": "evaluation/reproduce/{folder}.py"}
FILES = {
    "model": {"__init__.py.tmpl": f"{_METHOD}/__init__.py",
              "configuration.py.tmpl": f"{_METHOD}/configuration_{{folder}}.py",
              "modeling.py.tmpl": f"{_METHOD}/modeling_{{folder}}.py", "recipe.py.tmpl": f"{_METHOD}/recipe.py"},
    "diffusers": {"__init__.py.tmpl": f"{_METHOD}/__init__.py", "modeling.py.tmpl": f"{_METHOD}/modeling_{{folder}}.py",
                  "recipe.py.tmpl": f"{_METHOD}/recipe.py"},
    "adapter": {"__init__.py.tmpl": f"{_METHOD}/__init__.py", "adapters.py.tmpl": f"{_METHOD}/adapters.py",
                "recipe.py.tmpl": f"{_METHOD}/recipe.py"},
    "procedure": {"__init__.py.tmpl": f"{_METHOD}/__init__.py", "config.py.tmpl": f"{_METHOD}/config.py",
                  "runner.py.tmpl": f"{_METHOD}/runner.py"},
    "analysis": {"__init__.py.tmpl": f"{_METHOD}/__init__.py", "config.py.tmpl": f"{_METHOD}/config.py",
                 "runner.py.tmpl": f"{_METHOD}/runner.py"},
}
assert set(FILES) == set(KIND_LIBRARY), "every kind has its templates"

# What the generated mechanism test must compare, per kind (it fails until the developer writes it).
CHECKS = {
    "model": "compare the model's mechanism (its forward pass) against an independent computation: a forward "
             "written out with plain tensor ops from the state dict, a naive loop or a hand-worked example",
    "diffusers": "compare the model's mechanism (its forward pass) against an independent computation: a forward "
                 "written out with plain tensor ops from the state dict, a naive loop or a hand-worked example",
    "adapter": "compare the adapted layer's output against the paper's update computed by hand from the base "
               "weights and the adapter's weights",
    "procedure": "compare one step of the procedure (its loss and the change it makes to the weights or gradients) "
                 "against a hand-worked example",
    "analysis": "compare the analysis's measure against a closed form on a hand-made model or data set",
}


def _check_arguments(slug: str, kind: str, title: str | None, arxiv: str | None) -> None:
    if not SLUG.fullmatch(slug or ""):
        raise ValueError(f"slug must be lowercase letters and digits in words joined by single hyphens, starting "
                         f"with a letter (e.g. scaling-mlp); got {slug!r}")
    if kind not in FILES:
        raise ValueError(f"kind must be one of {', '.join(FILES)}; got {kind!r}")
    if title is not None and (not title.strip() or any(c in title for c in '\\\n\r"')):
        raise ValueError(f"--title must be one non-empty line without backslashes or double quotes; got {title!r}")
    if arxiv is not None and not ARXIV_ID.fullmatch(arxiv):
        raise ValueError(f"--arxiv expects a new-style arXiv id without version, e.g. 2306.13575; got {arxiv!r}")


def _existing_slugs(methods: Path) -> dict[str, str]:
    """slug -> folder of every method in `methods`, read from the records' source (nothing is imported)."""
    found = {}
    for init in sorted(methods.glob("*/__init__.py")):
        match = re.search(r"""\bslug\s*=\s*["']([^"']+)["']""", init.read_text())
        if match:
            found[match.group(1)] = init.parent.name
    return found


def targets(slug: str, kind: str, root: str | Path = ".") -> dict[str, Path]:
    """Template name -> the file it becomes under `root`, for a method `slug` of `kind`."""
    folder = slug.replace("-", "_")
    root = Path(root)
    return {name: root / path.format(folder=folder) for name, path in {**FILES[kind], **_COMMON}.items()}


def _values(slug: str, kind: str, title: str | None, arxiv: str | None) -> dict[str, str]:
    title = title or f"TODO: the title of the {slug} paper"
    arxiv_id = arxiv or "TODO: arXiv id, e.g. 2306.13575"
    return {
        "slug": slug,
        "folder": slug.replace("-", "_"),
        "Name": "".join(word.capitalize() for word in slug.split("-")),
        "kind": kind,
        "title": title,
        "arxiv_id": arxiv_id,
        "check": CHECKS[kind],
    }


def render(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def new_method(slug: str, kind: str, *, title: str | None = None, arxiv: str | None = None,
               root: str | Path = ".") -> list[Path]:
    """Write a draft method `slug` of `kind` into the repository at `root`; returns the files written.

    Every target is checked before anything is written: a bad argument, a slug or folder already in use, or any
    target file that exists is one error and leaves the tree as it was."""
    _check_arguments(slug, kind, title, arxiv)
    root = Path(root)
    methods = root / "hfpapers" / "methods"
    if not methods.is_dir():
        raise FileNotFoundError(f"{root.resolve()} is not an hfpapers repository (no hfpapers/methods/); run from "
                                "the repository root or pass --root")
    folder = slug.replace("-", "_")
    used = _existing_slugs(methods)
    if slug in used:
        raise FileExistsError(f"slug {slug!r} is already used by hfpapers/methods/{used[slug]}/")
    if (methods / folder).exists():
        raise FileExistsError(f"hfpapers/methods/{folder}/ already exists; choose another slug")
    paths = targets(slug, kind, root)
    taken = [str(p.relative_to(root)) for p in paths.values() if p.exists()]
    if taken:
        raise FileExistsError(f"these files already exist (nothing was written): {', '.join(taken)}")
    values = _values(slug, kind, title, arxiv)
    texts = {path: render((TEMPLATES / (kind if name in FILES[kind] else "common") / name).read_text(), values)
             for name, path in paths.items()}
    written: list[Path] = []
    try:
        for path, text in texts.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x") as f:  # "x": never overwrite a file that appeared meanwhile
                f.write(text)
            written.append(path)
    except OSError:
        for path in written:  # a half-written method would break discovery: leave the tree as it was
            path.unlink()
        if (methods / folder).is_dir() and not any((methods / folder).iterdir()):
            (methods / folder).rmdir()
        raise
    return written
