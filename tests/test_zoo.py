"""`hfpapers zoo build` packages a method into zoo/<slug>-<preset>/ and indexes it."""

from conftest import read_json, run_cli


def test_zoo_build_packages_and_indexes_a_method(tmp_path):
    run_cli("zoo", "build", "--output-dir", tmp_path, "--method", "scaling-mlp")
    folder = tmp_path / "scaling-mlp-tiny"
    assert (folder / "model.safetensors").exists() and (folder / "README.md").exists()
    assert not (folder / "checkpoints").exists()
    results = read_json(folder / "train_results.json")
    index = (tmp_path / "INDEX.md").read_text()
    assert f"| scaling-mlp | model | [Scaling MLPs: A Tale of Inductive Bias](https://arxiv.org/abs/2306.13575) | " \
           f"tiny | accuracy {results['eval']['accuracy']:.4f} on shapes |" in index
    # The zoo's model beats chance (10 classes) by a wide margin.
    assert results["eval"]["accuracy"] > 0.3
