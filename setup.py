"""Package layout that pyproject.toml cannot express: the top-level `model_cards/` folder (card templates and
per-method prose) ships inside the package as `hfpapers.model_cards`, so cards render from an installed wheel."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hfpapers", "hfpapers.*"]), "hfpapers.model_cards"],
    package_dir={"hfpapers.model_cards": "model_cards"},
)
