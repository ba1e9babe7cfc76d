"""`pip install` of the built wheel (not editable) in a fresh venv: train through to the card, push, pull.

The venv reuses this environment's installed dependencies through a .pth file (nothing is downloaded) but not
its editable hfpapers: .pth files inside a directory that a .pth file adds are not processed, so the editable
finder never loads, and hfpapers must come from the wheel.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, small_dataset_args
from hfpapers.testing import LocalHub

pytestmark = pytest.mark.slow


def run(*args, cwd, env=None, timeout=300) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**env_without_checkout(), **(env or {})})
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def env_without_checkout() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of what a clean checkout has (a stale build/ folder could add removed files)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("hfpapers", "model_cards"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", dist, source,
        cwd=source)
    (built,) = dist.glob("hfpapers-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root)
    python = root / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel,
        cwd=root)
    (target,) = (root / "lib").glob("python3*/site-packages")
    # Written after the install, so that pip saw an empty environment and installed the wheel's hfpapers.
    (target / "reuse-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root


def test_wheel_ships_the_card_templates_and_the_main_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"hfpapers/model_cards/{p.name}" for p in (REPO / "model_cards").glob("*.md")}
    assert "hfpapers/model_cards/template.md" in expected
    assert expected <= names, sorted(expected - names)
    assert "hfpapers/__main__.py" in names


def test_installed_wheel_trains_to_a_card_and_round_trips_through_a_hub(venv, tmp_path):
    from huggingface_hub import ModelCard

    work = tmp_path / "work"  # cwd away from the checkout, so nothing can import it from there
    work.mkdir()
    python, hfpapers = venv / "bin" / "python", venv / "bin" / "hfpapers"
    where = json.loads(run(python, "-c", "import json, hfpapers, hfpapers.cards as c;"
                                         "print(json.dumps([hfpapers.__file__, str(c.MODEL_CARDS_DIR)]))", cwd=work))
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where

    listed = run(python, "-m", "hfpapers", "list", cwd=work)
    assert "scaling-mlp" in listed and "efficientvim" in listed

    out = work / "scaling-mlp-tiny"
    run(hfpapers, "train", "scaling-mlp", "--preset", "tiny", "--output-dir", out, "--epochs", "1", "--no-progress",
        *small_dataset_args(), cwd=work)
    card = ModelCard.load(out / "README.md")
    measured = json.loads((out / "train_results.json").read_text())["eval"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        name: round(value, 4) for name, value in measured.items()}
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-classification"
    assert "arxiv:2306.13575" in card.data.tags
    # The method's prose comes from the wheel's copy of model_cards/scaling_mlp.md.
    prose = (REPO / "model_cards" / "scaling_mlp.md").read_text(encoding="utf-8").strip().splitlines()
    assert prose[0] in card.text and prose[-1] in card.text

    with LocalHub(data_dir=tmp_path / "hub-data") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": hub.token}
        run(hfpapers, "push", "tester/scaling-mlp-tiny", out, cwd=work, env=env)
        pulled = work / "pulled"
        run(hfpapers, "pull", "tester/scaling-mlp-tiny", "--local-dir", pulled, cwd=work, env=env)
    for name in ("model.safetensors", "config.json"):
        assert (pulled / name).read_bytes() == (out / name).read_bytes(), name
    assert 'from_pretrained("tester/scaling-mlp-tiny")' in (pulled / "README.md").read_text()
