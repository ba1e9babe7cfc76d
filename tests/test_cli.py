"""The `hfpapers` command as a user runs it."""

import json

import pytest

from conftest import read_json, run_cli, small_dataset_args

COMMANDS = [["list"], ["info"], ["new"], ["train"], ["run"], ["convert"], ["eval"], ["card"], ["push"], ["pull"],
            ["hub", "serve"], ["zoo", "build"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help(command):
    proc = run_cli(*command, "--help")
    assert proc.stdout.startswith("usage: hfpapers " + " ".join(command))


def test_list_and_info():
    assert "scaling-mlp" in run_cli("list").stdout
    records = json.loads(run_cli("list", "--json").stdout)
    assert [(r["slug"], r["arxiv_id"]) for r in records] == [
        ("croco", "2210.10716"), ("efficientvim", "2411.15241"), ("ftwt", "2110.08232"), ("gs-lora", "2403.11530"),
        ("layerdiffusion", "2402.17113"), ("llm-embedding", "2409.02727"), ("nc-deep-linear", "2301.00437"),
        ("nc-mixup", "2402.06171"), ("nc-perturbation", "2210.16658"), ("r-amt", "2307.15049"),
        ("read", "2412.17741"), ("scaling-mlp", "2306.13575"), ("tract", "2410.23970")]
    info = json.loads(run_cli("info", "scaling-mlp").stdout)
    assert info["presets"]["B_12-Wi_1024"]["config"]["hidden_size"] == 1024


def test_list_fits_a_100_column_terminal_and_names_kind_paper_and_entry_point():
    lines = run_cli("list").stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    text = "\n".join(lines)
    for record in json.loads(run_cli("list", "--json").stdout):
        assert record["title"] in text and record["entry_point"] in text
    assert any(line.split()[:3] == ["gs-lora", "procedure", "2403.11530"] and "2501.09705" in line for line in lines)


@pytest.mark.parametrize(("args", "message"), [
    (["info", "nope"], "unknown method 'nope'; known methods: croco, efficientvim, ftwt, gs-lora, layerdiffusion, "
                       "llm-embedding, nc-deep-linear, nc-mixup, nc-perturbation, r-amt, read, scaling-mlp, tract"),
    (["train", "scaling-mlp", "--output-dir", "x", "--preset", "huge"], "known presets: tiny"),
    (["train", "scaling-mlp", "--output-dir", "x", "--set", "colour=1"], "unknown settings ['colour']"),
    (["eval", "/nonexistent"], "has neither config.json nor hfpapers_run.json"),
    (["train", "scaling-mlp", "--output-dir", "x", "--dataset", "/nonexistent-folder-xyz"], "nonexistent-folder-xyz"),
])
def test_errors_are_one_line_and_exit_non_zero(args, message):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr


def test_eval_recomputes_the_training_run_metrics(trained_folder):
    metrics = json.loads(run_cli("eval", trained_folder).stdout)
    trained = read_json(trained_folder / "train_results.json")["eval"]
    assert metrics["accuracy"] == pytest.approx(trained["accuracy"])
    assert read_json(trained_folder / "eval_results.json")["dataset"] == "shapes"


def test_run_applies_a_procedure_to_a_trained_folder_and_writes_its_run_folder(trained_folder, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "forgot"
    proc = run_cli("run", "gs-lora", "--model", trained_folder, "--output-dir", out, "--tasks", "circle",
                   "--set", "num_epochs=1", "--set", "few_shot=8", "--set", "batch_size=8", *small_dataset_args())
    printed = json.loads(proc.stdout.splitlines()[-1])
    results = read_json(out / "results.json")
    assert printed["metrics"] == results["metrics"] and set(results["metrics"]) == {"acc_f", "acc_r", "h_mean"}
    assert [t["forget_classes"] for t in results["details"]["tasks"]] == [["circle"]]
    assert results["config"]["num_epochs"] == 1 and results["config"]["alpha"] == 0.1  # --set over the tiny preset
    run = read_json(out / "hfpapers_run.json")
    assert (run["method"], run["preset"], run["model"]) == ("gs-lora", "tiny", str(trained_folder))
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-classification" and "procedure" in card.data.tags
    assert "**Classes removed:** circle" in card.text
    run_cli("card", out, "--repo-id", "someone/forgot")
    assert 'PeftModel.from_pretrained(original_model, "someone/forgot"' in (out / "README.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["run", "scaling-mlp", "--model", "m", "--output-dir", "x"], "is a model method: train it with `hfpapers train"),
    (["run", "gs-lora", "--model", "m", "--output-dir", "x", "--set", "colour=1"], "unknown settings ['colour']"),
])
def test_run_errors_are_one_line(args, message):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr


def test_run_refuses_a_used_folder_and_overwrites_only_an_earlier_run(trained_folder, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    args = ["run", "gs-lora", "--model", trained_folder, "--tasks", "circle", "--set", "num_epochs=1",
            "--set", "few_shot=8", "--set", "batch_size=8", *small_dataset_args()]
    proc = run_cli(*args, "--output-dir", used, check=False)
    assert proc.returncode == 1 and "is not empty (it holds notes.txt)" in proc.stderr
    proc = run_cli(*args, "--output-dir", used, "--overwrite-output-dir", check=False)
    assert proc.returncode == 1 and "is not the folder of an earlier run" in proc.stderr
    assert (used / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    run_cli(*args, "--output-dir", out)
    (out / "stale.txt").write_text("from the first run")
    run_cli(*args, "--output-dir", out, "--overwrite-output-dir")
    assert not (out / "stale.txt").exists() and (out / "results.json").exists()


def test_version():
    import hfpapers

    assert run_cli("--version").stdout.strip() == f"hfpapers {hfpapers.__version__}"


@pytest.mark.parametrize(("args", "message"), [
    (["--config", "num_block=6"], "unknown config values ['num_block'] for 'scaling-mlp'"),
    (["--config", "num_blocks=-2"], "num_blocks must be a positive integer, got -2"),
    (["--set", "mixup_alpha=-1"], "{'mixup_alpha': -1} out of range"),
])
def test_bad_config_and_recipe_values_are_one_line_before_training(args, message, tmp_path):
    """A misspelt config value was stored and ignored; a bad one printed a traceback; a negative mixup trained."""
    proc = run_cli("train", "scaling-mlp", "--output-dir", tmp_path / "out", *args, *small_dataset_args(), check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_eval_reads_safetensors_only_and_refuses_weights_that_do_not_fit(trained_folder, tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    pickled = tmp_path / "pickled"
    shutil.copytree(trained_folder, pickled, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    proc = run_cli("eval", pickled, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no safetensors weights of a 'scaling-mlp' model" in proc.stderr
    partial = tmp_path / "partial"
    shutil.copytree(trained_folder, partial, ignore=shutil.ignore_patterns("checkpoints"))
    save_file({"classifier.weight": torch.zeros(4, 128)}, partial / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("eval", partial, check=False)
    assert proc.returncode == 1 and "its weights do not fit the 'scaling-mlp' model" in proc.stderr, proc.stderr


def test_a_schedule_longer_than_the_run_is_refused_before_any_data_is_built(tmp_path, monkeypatch):
    """EfficientViM's warm-up + cool-down (2 epochs in its tiny preset) leave no room in one epoch: said at once, not
    after its 2,400 images are drawn."""
    from hfpapers import data
    from hfpapers.engine import train

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was built before the arguments were checked")

    monkeypatch.setattr(data, "load", no_data)
    message = r"warmup_epochs \(1\) \+ cooldown_epochs \(1\) must be fewer than num_epochs \(1\)"
    with pytest.raises(ValueError, match=message):
        train("efficientvim", str(tmp_path / "out"), num_epochs=1)
    assert not (tmp_path / "out").exists()
