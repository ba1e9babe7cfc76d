import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# A small shapes set so that whole training runs take seconds.
SMALL_SHAPES = {"resolution": 16, "num_train": 256, "num_test": 64, "num_classes": 4}


def small_dataset_args() -> list[str]:
    return [arg for k, v in SMALL_SHAPES.items() for arg in ("--dataset-option", f"{k}={v}")]


def run_cli(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    """`hfpapers ...` in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "hfpapers.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"hfpapers {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def trained_folder(tmp_path_factory) -> Path:
    """A tiny Scaling MLP trained for two epochs with the CLI (shared by the eval, card and Hub tests)."""
    out = tmp_path_factory.mktemp("run") / "scaling-mlp-tiny"
    run_cli("train", "scaling-mlp", "--output-dir", out, "--epochs", "2", "--no-progress", *small_dataset_args())
    return out


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
