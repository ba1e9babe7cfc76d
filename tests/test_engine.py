"""The shared engine: exact resume after a kill, two processes, accumulation, metrics and curves."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_json, run_cli, small_dataset_args

# Small enough for seconds, long enough (many steps, a checkpoint after each) to be killed half-way.
# The EMA of the weights is part of the state that must come back.
RESUME_ARGS = ["--epochs", "6", "--checkpoint-every-steps", "1", "--config", "hidden_size=32", "--no-progress",
               "--set", "ema_decay=0.9", *small_dataset_args()]


def train_command(out, *extra):
    return [sys.executable, "-m", "hfpapers.cli", "train", "scaling-mlp", "--output-dir", str(out), *extra]


def test_resume_after_a_kill_reaches_the_same_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("train", "scaling-mlp", "--output-dir", straight, *RESUME_ARGS)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_command(killed, *RESUME_ARGS), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-00000005" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its fifth checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    interrupted_at = read_json(sorted((killed / "checkpoints").glob("step-*/trainer_state.json"))[-1])["global_step"]

    run_cli("train", "scaling-mlp", "--output-dir", killed, "--resume", *RESUME_ARGS)
    expected, got = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    total = read_json(straight / "train_results.json")["global_step"]
    assert 5 <= interrupted_at < total
    # The metrics log reads as one run: the interrupted run's extra lines were dropped on resume.
    assert (killed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli("train", "scaling-mlp", "--output-dir", tmp_path, "--resume", *small_dataset_args(), check=False)
    assert proc.returncode == 1
    assert "no complete checkpoint" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["scaling-mlp", "efficientvim", "llm-embedding", "layerdiffusion", "read"])
def test_two_processes_share_the_work(method, tmp_path):
    from accelerate.test_utils.testing import get_launch_command, get_torch_dist_unique_port

    out = tmp_path / "ddp"
    command = get_launch_command(multi_gpu=True, num_processes=2, num_machines=1, mixed_precision="no",
                                 dynamo_backend="no", main_process_port=get_torch_dist_unique_port())
    # The `accelerate` of this interpreter's environment, whether or not that environment is on PATH.
    command[0] = str(Path(sys.executable).with_name("accelerate"))
    command += [str(REPO / "training" / "train.py"), method, "--output-dir", str(out), "--epochs", "3",
                "--no-progress", "--batch-size", "64"]
    if method == "llm-embedding":  # text triplets; its tiny decoder's warm-up is a first fit in the same processes
        command += ["--dataset-option", "num_train=256", "--dataset-option", "num_test=64",
                    "--set", "pretrain_epochs=1"]
    elif method == "layerdiffusion":  # RGBA layers; its small VAE's warm-up runs in each process
        command += ["--dataset-option", "resolution=32", "--dataset-option", "num_train=256",
                    "--dataset-option", "num_test=64", "--set", "pretrain_vae_steps=5"]
    elif method == "read":  # referring scenes; its small SAM's warm-up is a first fit in the same processes
        command += ["--dataset-option", "num_train=256", "--dataset-option", "num_test=32",
                    "--set", "sam_pretrain_epochs=1"]
    else:
        command += small_dataset_args()
    if method == "efficientvim":  # its schedule needs more epochs than warm-up + cool-down
        command += ["--set", "warmup_epochs=1", "--set", "cooldown_epochs=1"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(out / "train_results.json")
    batch = 64
    per_process_batches = 256 // (batch * 2)
    # Each rank stepped through its own half of every epoch: 3 epochs x 2 batches x 64 examples.
    assert results["examples_per_process"] == [3 * per_process_batches * batch] * 2
    assert results["global_step"] == 3 * per_process_batches
    assert read_json(out / "hfpapers_run.json")["num_processes"] == 2


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """Two accumulated micro-batches of 32 give the update of one batch of 64 (SGD, no augmentation)."""
    from hfpapers.data import load
    from hfpapers.engine import TrainingArguments, fit
    from hfpapers.methods.scaling_mlp.recipe import ScalingMLPRecipe
    from hfpapers.registry import create_processor

    import hfpapers

    data = load("shapes", resolution=8, num_train=64, num_test=16, num_classes=3)
    recipe = ScalingMLPRecipe(optimizer="sgd", mixup_alpha=0.0, label_smoothing=0.0, crop_scale=(1.0, 1.0),
                              crop_ratio=(1.0, 1.0), horizontal_flip=False)
    weights = []
    for batch, accumulation in ((64, 1), (32, 2)):
        torch.manual_seed(0)
        model = hfpapers.create_model("scaling-mlp", preset="tiny", image_size=8, num_labels=3)
        args = TrainingArguments(output_dir=str(tmp_path / f"b{batch}"), num_epochs=1, learning_rate=0.1,
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                 progress_bar=False)
        fit(model, data, recipe, args, create_processor("scaling-mlp", model.config))
        weights.append(model.state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=1e-5)


def test_run_folder_has_metrics_curves_weights_and_card(trained_folder):
    lines = [json.loads(line) for line in (trained_folder / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_accuracy" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert any("loss" in r and "lr" in r for r in lines)
    png = (trained_folder / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                 "modeling_scaling_mlp.py", "configuration_scaling_mlp.py"):
        assert (trained_folder / name).exists(), name
    assert not list(trained_folder.glob("*.bin"))
    assert read_json(trained_folder / "config.json")["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_scaling_mlp.ScalingMLPForImageClassification")


def test_bad_training_arguments_are_rejected():
    from hfpapers.engine import TrainingArguments

    with pytest.raises(ValueError, match="gradient_accumulation_steps must be at least 1"):
        TrainingArguments(output_dir="x", gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainingArguments(output_dir="x", mixed_precision="fp8")
