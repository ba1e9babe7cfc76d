"""`hfpapers zoo build` packages a method into zoo/<slug>-<preset>/ and indexes it."""

import re

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
    assert re.search(r"on shapes \| \d+\.\d / 40 \| scaling-mlp-tiny \|", index)  # seconds against its budget
    assert re.search(r"The zoo of all 26 papers has 1200 s on 2 cores; the \d+ records registered now hold \d+ s",
                     index)
    # The zoo's model beats chance (10 classes) by a wide margin.
    assert results["eval"]["accuracy"] > 0.3


def test_the_records_budgets_fit_the_zoo_of_all_papers():
    """Every paper's default builds in `make zoo`'s 20 minutes: the records registered now may hold at most their
    share, so that the papers still to come keep theirs (ZOO_BUDGET_S / ZOO_PAPERS each on average)."""
    import hfpapers
    from hfpapers.zoo import ZOO_BUDGET_S, ZOO_PAPERS

    records = hfpapers.list_methods()
    spent = sum(r.time_budget_s for r in records)
    left_per_paper = (ZOO_BUDGET_S - spent) / (ZOO_PAPERS - len(records))
    assert spent <= ZOO_BUDGET_S and left_per_paper >= 30, (spent, left_per_paper)
