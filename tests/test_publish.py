"""A trained Scaling MLP through the card, `hfpapers push` / `pull` and the Hub clients, against a LocalHub."""

import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from conftest import REPO, run_cli
from hfpapers.testing import LocalHub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LocalHub(data_dir=tmp_path_factory.mktemp("hub-data")) as server:
        yield server


def hub_env(hub, tmp_path):
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": getattr(hub, "token", "hf_fake"),
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_python(code, env):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("{"), proc.stdout[-2000:]
    return json.loads(last)


def test_card_round_trips_and_validates_on_the_hub(trained_folder, hub):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_folder / "README.md")
    measured = json.loads((trained_folder / "train_results.json").read_text())["eval"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == round(measured["accuracy"], 4)
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-classification"
    assert "arxiv:2306.13575" in card.data.tags
    text = card.text
    for expected in ("Scaling MLPs: A Tale of Inductive Bias", "@inproceedings{bachmann2023scaling",
                     "trust_remote_code=True", "measured here vs reported in the paper", "94.2"):
        assert expected in text, expected
    assert "<user>" not in text and "TODO" not in text
    request = urllib.request.Request(f"{hub.url}/api/validate-yaml", method="POST",
                                     data=json.dumps({"content": str(card), "repoType": "model"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        assert json.loads(response.read()) == {"errors": [], "warnings": []}


def test_card_command_names_the_repo(trained_folder, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(trained_folder, folder)
    run_cli("card", folder, "--repo-id", "someone/mlp")
    assert 'from_pretrained("someone/mlp")' in (folder / "README.md").read_text()


def test_push_then_load_by_repo_id_is_bit_identical(trained_folder, hub, tmp_path):
    env = hub_env(hub, tmp_path)
    before = {p.name: p.read_bytes() for p in trained_folder.iterdir() if p.is_file()}
    run_cli("push", "tester/scaling-mlp-tiny", trained_folder, env=env)
    assert {p.name: p.read_bytes() for p in trained_folder.iterdir() if p.is_file()} == before
    out = run_python(f"""
        import json, numpy as np, torch, hfpapers
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoModelForImageClassification, pipeline
        from huggingface_hub import HfApi
        m = AutoModelForImageClassification.from_pretrained("tester/scaling-mlp-tiny")
        local = load_file({str(trained_folder / 'model.safetensors')!r})
        same = all(torch.equal(local[k], v) for k, v in m.state_dict().items()) and local.keys() == m.state_dict().keys()
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
        remote = pipeline("image-classification", model="tester/scaling-mlp-tiny")(image)
        here = pipeline("image-classification", model={str(trained_folder)!r})(image)
        files = HfApi().list_repo_files("tester/scaling-mlp-tiny")
        readme = open(__import__("huggingface_hub").hf_hub_download("tester/scaling-mlp-tiny", "README.md")).read()
        print(json.dumps({{"same": same, "remote": remote, "here": here, "files": files,
                           "named": 'from_pretrained("tester/scaling-mlp-tiny")' in readme}}))
    """, env)
    assert out["same"] and out["remote"] == out["here"] and out["named"]
    assert "model.safetensors" in out["files"] and "modeling_scaling_mlp.py" in out["files"]
    assert not any(f.startswith("checkpoints/") for f in out["files"])

    # After one download the cache serves it with the Hub unreachable.
    offline = run_python("""
        import json, hfpapers
        from transformers import AutoModelForImageClassification
        m = AutoModelForImageClassification.from_pretrained("tester/scaling-mlp-tiny")
        print(json.dumps({"labels": len(m.config.id2label)}))
    """, {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline["labels"] == 4


def test_model_push_to_hub_and_pull(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    out = run_python("""
        import json, torch, hfpapers
        from transformers import AutoModelForImageClassification
        torch.manual_seed(0)
        model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=3).eval()
        model.push_to_hub("tester/pushed-directly")
        loaded = AutoModelForImageClassification.from_pretrained("tester/pushed-directly").eval()
        x = torch.randn(2, 3, 16, 16)
        print(json.dumps({"equal": torch.equal(model(pixel_values=x).logits, loaded(pixel_values=x).logits)}))
    """, env)
    assert out["equal"]
    pulled = run_cli("pull", "tester/pushed-directly", "--local-dir", tmp_path / "pulled", env=env).stdout.strip()
    assert (tmp_path / "pulled" / "model.safetensors").exists() and pulled.endswith("pulled")


def test_push_to_a_stopped_hub_fails_in_one_line_and_keeps_the_folder(trained_folder, tmp_path):
    before = {p.name: p.read_bytes() for p in trained_folder.iterdir() if p.is_file()}
    proc = run_cli("push", "tester/nowhere", trained_folder, check=False,
                   env={**hub_env(type("H", (), {"url": "http://127.0.0.1:9"}), tmp_path)})
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot reach the Hub at http://127.0.0.1:9/" in proc.stderr
    assert {p.name: p.read_bytes() for p in trained_folder.iterdir() if p.is_file()} == before
