"""The `hfpapers` command as a user runs it."""

import json

import pytest

from conftest import read_json, run_cli

COMMANDS = [["list"], ["info"], ["train"], ["eval"], ["card"], ["push"], ["pull"], ["hub", "serve"], ["zoo", "build"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help(command):
    proc = run_cli(*command, "--help")
    assert proc.stdout.startswith("usage: hfpapers " + " ".join(command))


def test_list_and_info():
    assert "scaling-mlp" in run_cli("list").stdout
    records = json.loads(run_cli("list", "--json").stdout)
    assert [(r["slug"], r["arxiv_id"]) for r in records] == [("efficientvim", "2411.15241"),
                                                             ("layerdiffusion", "2402.17113"),
                                                             ("llm-embedding", "2409.02727"),
                                                             ("read", "2412.17741"),
                                                             ("scaling-mlp", "2306.13575")]
    info = json.loads(run_cli("info", "scaling-mlp").stdout)
    assert info["presets"]["B_12-Wi_1024"]["hidden_size"] == 1024


@pytest.mark.parametrize(("args", "message"), [
    (["info", "nope"], "unknown method 'nope'; known methods: efficientvim, layerdiffusion, llm-embedding, read, scaling-mlp"),
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
