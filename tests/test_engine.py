"""The shared engine: exact resume after a kill, two processes, accumulation, metrics and curves."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.tracking import GeneralTracker
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file

from conftest import REPO, read_json, run_cli, small_dataset_args
from hfpapers.engine import Callback, Recipe, TensorDataset, TrainingArguments, fit

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
    elif method == "layerdiffusion":  # RGBA layers; three stages in the same processes: the small VAE, the
        # transparent VAE, the UNet
        command += ["--dataset-option", "resolution=32", "--dataset-option", "num_train=256",
                    "--dataset-option", "num_test=64", "--set", "pretrain_vae_epochs=1",
                    "--set", 'vae_stage={"num_epochs": 1}']
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


# ------------------------------------------------------------------ the engine's API, on a tiny regression
# A two-layer regressor on random data trains in milliseconds per epoch, so each test below runs the real loop.

class Regressor(torch.nn.Module, PyTorchModelHubMixin):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class RegressionRecipe(Recipe):
    metric = "mse"

    def __init__(self, nan_at_step=None):
        self.nan_at_step, self.seen = nan_at_step, []

    def prepare_dataset(self, dataset, processor):
        return dataset

    def compute_loss(self, model, batch, step_rng, state):
        self.seen.append((state.epoch, state.num_epochs, state.global_step, state.ema_model is not None))
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        return loss * float("nan") if state.global_step == self.nan_at_step else loss

    def eval_outputs(self, model, batch):
        return {"error": (model(batch["x"]) - batch["y"]).pow(2).mean(-1)}

    def compute_metrics(self, outputs):
        return {"mse": outputs["error"].mean().item()}


def regression_data(num_train=64):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(num_train + 16, 4, generator=g), torch.randn(4, 2, generator=g)
    sets = TensorDataset(x=x[:num_train], y=x[:num_train] @ w), TensorDataset(x=x[num_train:], y=x[num_train:] @ w)
    return dict(zip(("train", "test"), sets))


def fit_regression(out, recipe=None, callbacks=None, **settings):
    torch.manual_seed(0)
    model = Regressor()
    args = TrainingArguments(output_dir=str(out), **{"num_epochs": 2, "per_device_train_batch_size": 8,
                                                     "learning_rate": 0.01, "progress_bar": False, **settings})
    return model, fit(model, regression_data(), recipe or RegressionRecipe(), args, callbacks=callbacks)


class Recorder(Callback):
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def on_train_begin(self, state, model, accelerator):
        self.calls.append((self.name, "begin", state.epoch, state.global_step))

    def on_step_end(self, state, model, batch, accelerator):
        self.calls.append((self.name, "step", state.epoch, state.global_step, len(batch["x"])))

    def on_evaluate(self, state, model, metrics, accelerator):
        metrics[f"{self.name}_seen"] = float(state.global_step)  # a callback's own metric, logged with the eval

    def on_epoch_end(self, state, model, accelerator):
        self.calls.append((self.name, "epoch", state.epoch, state.global_step))

    def on_train_end(self, state, model, accelerator):
        self.calls.append((self.name, "end", state.epoch, state.global_step))


def test_callbacks_see_every_epoch_and_step_and_the_recipe_sees_the_state(tmp_path):
    calls = []

    class RecipeWithCallback(RegressionRecipe):
        def callbacks(self):
            return [Recorder("recipe", calls)]

    recipe = RecipeWithCallback()
    # 64 examples in batches of 8, two accumulated per step: 4 optimiser steps per epoch, 3 epochs.
    fit_regression(tmp_path, recipe, callbacks=[Recorder("user", calls)], num_epochs=3,
                   gradient_accumulation_steps=2, ema_decay=0.5)
    user = [c[1:] for c in calls if c[0] == "user"]
    assert [c for c in user if c[0] == "epoch"] == [("epoch", 1, 4), ("epoch", 2, 8), ("epoch", 3, 12)]
    assert [c for c in user if c[0] == "step"] == [("step", (s - 1) // 4, s, 8) for s in range(1, 13)]
    assert user[0] == ("begin", 0, 0) and user[-1] == ("end", 3, 12)
    assert [c[0] for c in calls[:2]] == ["user", "recipe"]  # the caller's callbacks first, then the recipe's
    assert len(calls) == 2 * len(user)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_mse" in line]
    assert [(r["eval_user_seen"], r["eval_recipe_seen"]) for r in evals] == [(4.0, 4.0), (8.0, 8.0), (12.0, 12.0)]
    # the loss saw the epoch being trained (two micro-batches per step), the run's length and the EMA model
    assert recipe.seen == [(e, 3, e * 4 + m // 2, True) for e in range(3) for m in range(8)]


def test_a_callback_can_change_the_gradients_before_the_optimizer_step(tmp_path):
    class FreezeFirst(Callback):
        def on_before_optimizer_step(self, state, model, accelerator):
            model.first.weight.grad.zero_()

    torch.manual_seed(0)
    initial = Regressor().state_dict()
    model, _ = fit_regression(tmp_path, callbacks=[FreezeFirst()], max_grad_norm=0.5)
    # AdamW without weight decay moves nothing whose gradient was always zero.
    assert torch.equal(model.first.weight, initial["first.weight"])
    assert not torch.equal(model.first.bias, initial["first.bias"])
    assert not torch.equal(model.second.weight, initial["second.weight"])


def test_the_weight_average_starts_at_ema_start_epoch(tmp_path):
    """EMA from epoch 1 of 3: the first step of epoch 1 copies the weights, later steps average them in (by hand)."""
    weights = []

    class Snapshot(Callback):
        def on_step_end(self, state, model, batch, accelerator):
            weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    torch.manual_seed(0)
    model, result = fit_regression(tmp_path, callbacks=[Snapshot()], num_epochs=3, ema_decay=0.5, ema_start_epoch=1)
    steps_per_epoch = len(weights) // 3
    average = dict(weights[steps_per_epoch])
    for w in weights[steps_per_epoch + 1:]:
        average = {k: 0.5 * average[k] + 0.5 * w[k] for k in average}
    for name, value in result.ema_model.state_dict().items():
        torch.testing.assert_close(value, average[name], rtol=1e-6, atol=1e-7)
    # the saved model is the average
    saved = Regressor.from_pretrained(tmp_path)
    torch.testing.assert_close(saved.state_dict()["first.weight"], average["first.weight"], rtol=1e-6, atol=1e-7)


class Payload:
    """Unpickling it creates `marker`: the proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_never_unpickles_anything_from_the_checkpoint(tmp_path):
    import pickle

    first = tmp_path / "first"
    fit_regression(first, num_epochs=1, ema_decay=0.5)
    checkpoint = first / "checkpoints" / "step-00000008"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == ["ema.safetensors", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng_state_0.json", "rng_state_0.safetensors", "scheduler.json", "scheduler.safetensors",
                     "trainer_state.json"]
    marker = tmp_path / "marker"
    payload = pickle.dumps(Payload(marker))
    for name in files:
        run = tmp_path / f"planted-{name}"
        shutil.copytree(first, run)
        (run / "checkpoints" / "step-00000008" / name).write_bytes(payload)
        with pytest.raises((ValueError, FileNotFoundError), match=name.replace(".", r"\.")):
            fit_regression(run, num_epochs=1, ema_decay=0.5, resume_from="latest")
        assert not marker.exists(), name
    # Pickle files that accelerate's save_state would have written are never opened.
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (checkpoint / name).write_bytes(payload)
    fit_regression(first, num_epochs=1, ema_decay=0.5, resume_from="latest")
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: unpickling it is what would have created the marker
    assert marker.exists()


def test_resume_is_exact_for_optimizer_scheduler_ema_and_rng(tmp_path):
    fit_regression(tmp_path / "straight", num_epochs=3, ema_decay=0.5, lr_scheduler="cosine")
    fit_regression(tmp_path / "resumed", num_epochs=3, ema_decay=0.5, lr_scheduler="cosine", checkpoint_every_steps=5,
                   keep_checkpoints=10)
    # Back to the checkpoint at step 10, in the middle of the second epoch (8 steps per epoch), as after a kill.
    for later in ("step-00000015", "step-00000016", "step-00000020", "step-00000024"):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / later)
    (tmp_path / "resumed" / "model.safetensors").unlink()
    fit_regression(tmp_path / "resumed", num_epochs=3, ema_decay=0.5, lr_scheduler="cosine", resume_from="latest")
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_used_output_folder_is_refused_unless_overwritten(tmp_path):
    fit_regression(tmp_path, num_epochs=3)  # checkpoints at steps 16 and 24 remain
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        fit_regression(tmp_path, num_epochs=1)
    fit_regression(tmp_path, num_epochs=1, overwrite_output_dir=True)
    # Only the new run's checkpoint is left: the old run's later steps would have made rotation delete it.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000008"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1 + 1  # 1 loss line (step 8) + 1 eval


def test_resume_with_other_settings_is_refused_and_names_the_difference(tmp_path):
    fit_regression(tmp_path, num_epochs=1)
    with pytest.raises(ValueError, match=r"training_arguments\.learning_rate: 0\.01 in the checkpoint, 0\.02 now"):
        fit_regression(tmp_path, num_epochs=1, learning_rate=0.02, resume_from="latest")
    with pytest.raises(ValueError, match=r"training_arguments\.num_epochs: 1 in the checkpoint, 2 now"):
        fit_regression(tmp_path, num_epochs=2, resume_from="latest")
    # What only changes the reporting may differ: the run is already complete, so nothing more is trained.
    _, result = fit_regression(tmp_path, num_epochs=1, resume_from="latest", log_every_steps=3)
    assert result.global_step == 8


def test_train_refuses_a_used_folder_and_a_changed_dataset_on_resume(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli("train", "scaling-mlp", "--output-dir", tmp_path, *small_dataset_args(), check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is not empty (it holds notes.txt)" in proc.stderr and "--overwrite-output-dir" in proc.stderr
    out = tmp_path / "run"
    run_cli("train", "scaling-mlp", "--output-dir", out, "--epochs", "1", "--no-progress", *small_dataset_args())
    proc = run_cli("train", "scaling-mlp", "--output-dir", out, "--epochs", "1", "--resume", "--no-progress",
                   *small_dataset_args()[:-2], "--dataset-option", "num_classes=3", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "dataset_kwargs.num_classes: 4 in the checkpoint, 3 now" in proc.stderr


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    from hfpapers.engine import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at epoch 1, optimiser step 6.*"
                                                 r"last good checkpoint is .*step-00000005"):
        fit_regression(tmp_path, RegressionRecipe(nan_at_step=5), checkpoint_every_steps=1, keep_checkpoints=3)
    assert not (tmp_path / "model.safetensors").exists()  # no final weights from a run that failed
    last = load_file(tmp_path / "checkpoints" / "step-00000005" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in last.values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from hfpapers.engine import NonFiniteLossError

    class PoisonAtStep3(Callback):
        def on_before_optimizer_step(self, state, model, accelerator):
            if state.global_step == 2:  # the third step
                model.second.bias.grad.fill_(float("inf"))

    with pytest.raises(NonFiniteLossError, match=r"weights are not finite after optimiser step 3.*step-00000002"):
        fit_regression(tmp_path, callbacks=[PoisonAtStep3()], checkpoint_every_steps=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


@pytest.mark.parametrize(("settings", "error", "message"), [
    ({"num_epochs": "abc"}, TypeError, "num_epochs must be int, got 'abc'"),
    ({"num_epochs": True}, TypeError, "num_epochs must be int, got True"),
    ({"num_epochs": 2.5}, TypeError, "num_epochs must be int, got 2.5"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate must be a finite number above 0, got nan"),
    ({"learning_rate": float("inf")}, ValueError, "learning_rate must be a finite number above 0, got inf"),
    ({"learning_rate": 0}, ValueError, "learning_rate must be a finite number above 0, got 0.0"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be a finite number of at least 0"),
    ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be a finite number above 0"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps must be at least 0"),
    ({"checkpoint_every_steps": 0}, ValueError, "checkpoint_every_steps must be at least 1"),
    ({"num_epochs": 3, "ema_start_epoch": 3}, ValueError, "ema_start_epoch must lie in [0, num_epochs=3), got 3"),
    ({"progress_bar": "no"}, TypeError, "progress_bar must be bool, got 'no'"),
    ({"report_to": 3}, TypeError, "report_to must be str or list, got 3"),
])
def test_training_arguments_check_types_and_ranges(settings, error, message):
    with pytest.raises(error, match=re.escape(message)):
        TrainingArguments(output_dir="x", **settings)
    assert TrainingArguments(output_dir="x", learning_rate=1).learning_rate == 1.0  # `--set learning_rate=1`


@pytest.mark.parametrize("args", [["--lr", "nan"], ["--set", "num_epochs=abc"]])
def test_bad_arguments_on_the_command_line_are_one_line(args, tmp_path):
    proc = run_cli("train", "scaling-mlp", "--output-dir", tmp_path / "out", *args, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ("learning_rate must be a finite number" if "--lr" in args else "num_epochs must be int") in proc.stderr


def test_a_full_disk_is_named_with_the_file(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    import hfpapers.engine.run_folder as run_folder

    def full(tensors, path, *args, **kwargs):  # what safetensors raises on a full disk (observed on a 64 KiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(run_folder, "save_file", full)
    with pytest.raises(OSError, match=r"^no space left on device while writing .*step-00000008.model\.safetensors$") \
            as caught:
        fit_regression(tmp_path / "checkpoint", num_epochs=1)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    monkeypatch.setattr(Regressor, "save_pretrained", lambda self, path: full(None, path))
    with pytest.raises(OSError, match=r"^no space left on device while writing .*final$"):
        fit_regression(tmp_path / "final", num_epochs=1)


class ListTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is sent, registered by name as a package's tracker would be."""

    name, requires_logging_directory, main_process_only = "hfpapers-test-list", False, True
    runs: list = []

    def __init__(self, run_name, **kwargs):
        super().__init__()
        self.record = {"run_name": run_name, "config": None, "logs": [], "finished": False}
        ListTracker.runs.append(self.record)

    @property
    def tracker(self):
        return self.record

    def store_init_configuration(self, values):
        self.record["config"] = values

    def log(self, values, step=None, **kwargs):
        self.record["logs"].append((step, values))

    def finish(self):
        self.record["finished"] = True


def test_report_to_sends_metrics_to_accelerate_trackers(tmp_path, monkeypatch):
    from accelerate.tracking import register_tracker_class

    register_tracker_class(ListTracker)
    fit_regression(tmp_path, num_epochs=2, log_every_steps=4, report_to="hfpapers-test-list")
    record = ListTracker.runs[-1]
    assert record["config"]["learning_rate"] == 0.01 and record["finished"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["logs"] == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in lines]
    assert [step for step, values in record["logs"] if "eval_mse" in values] == [8, 16]
    # A built-in tracker whose package is missing is an error, not silence (accelerate would drop it).
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"report_to=\['tensorboard'\] needs its package installed "
                                         r"\(pip install tensorboard\)"):
        fit_regression(tmp_path / "tb", report_to="tensorboard")


# ------------------------------------------------------------------ progress bars beyond fit


def test_warm_up_stages_show_a_progress_bar_unless_bars_are_off(tmp_path, capsys):
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from hfpapers.engine import warm_start

    warm_start(tmp_path / "base-regressor", Regressor, regression_data(), RegressionRecipe(), seed=0, num_epochs=1,
               per_device_train_batch_size=8)
    err = capsys.readouterr().err
    assert "warm-up base-regressor" in err and "8/8" in err, err
    disable_progress_bars("hfpapers")
    try:
        warm_start(tmp_path / "again", Regressor, regression_data(), RegressionRecipe(), seed=0, num_epochs=1,
                   per_device_train_batch_size=8)
    finally:
        enable_progress_bars("hfpapers")
    assert capsys.readouterr().err == ""


def test_no_progress_also_silences_data_building_and_warm_up_bars(tmp_path, capsys):
    from huggingface_hub.utils import are_progress_bars_disabled

    from hfpapers.engine import train

    train("scaling-mlp", str(tmp_path), dataset_kwargs={"resolution": 8, "num_train": 64, "num_test": 16,
                                                        "num_classes": 3},
          num_epochs=1, per_device_train_batch_size=64, progress_bar=False)
    err = capsys.readouterr().err
    # (transformers' own "Writing model shards" bar follows HF_HUB_DISABLE_PROGRESS_BARS, not this flag)
    assert "building" not in err and "train:" not in err, err
    assert not are_progress_bars_disabled("hfpapers")  # on again after the run


def test_each_gs_lora_task_shows_a_progress_bar_unless_bars_are_off(tmp_path, capsys):
    import datasets
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    import hfpapers
    from hfpapers.methods.gs_lora import ContinualForgetter, GSLoRAConfig

    torch.manual_seed(0)
    model = hfpapers.create_model("scaling-mlp", preset="tiny", image_size=4, num_labels=3, num_blocks=1,
                                  hidden_size=8)
    images = datasets.Dataset.from_dict({"pixel_values": torch.randn(24, 3, 4, 4).tolist(),
                                         "label": [i % 3 for i in range(24)]})
    config = GSLoRAConfig(rank=2, num_epochs=1, batch_size=8, alpha=1e-3)
    forgetter = ContinualForgetter(model, config, eval_data=images, output_dir=str(tmp_path))
    forgetter.forget([0], images.filter(lambda r: r["label"] == 0), images.filter(lambda r: r["label"] != 0))
    err = capsys.readouterr().err
    assert "forgetting task 1: 100%" in err, err
    disable_progress_bars("hfpapers")
    try:
        forgetter.forget([1], images.filter(lambda r: r["label"] == 1), images.filter(lambda r: r["label"] == 2))
    finally:
        enable_progress_bars("hfpapers")
    assert "forgetting task 2" not in capsys.readouterr().err
