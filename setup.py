"""Package layout that pyproject.toml cannot express: the top-level `model_cards/` folder (card templates and
per-method prose) ships inside the package as `hfpapers.model_cards`, so cards render from an installed wheel; the
templates of `hfpapers new` (hfpapers/templates/, data only) ship as namespace packages."""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=[*find_packages(include=["hfpapers", "hfpapers.*"]), "hfpapers.model_cards",
              *find_namespace_packages(include=["hfpapers.templates", "hfpapers.templates.*"])],
    package_dir={"hfpapers.model_cards": "model_cards"},
)
