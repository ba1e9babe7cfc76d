"""Neural collapse in deep linear networks (nc-deep-linear): the deep linear head against a naive loop, the UFM
solver's learned norms against an independent scalar minimisation of the objective, minority collapse where
n_k <= N^2 lambda_W lambda_H, the predicted frames, the closed form, and the runner end to end at tiny size."""

import json

import pytest
import torch

from hfpapers.methods.nc_deep_linear import DeepLinearClassifier, NcDeepLinearConfig, solve_ufm
from hfpapers.methods.nc_deep_linear.ufm import ufm_objective

COUNTS = (200, 100, 50, 50)  # the official imbalanced counts


def scalar_optimum(n_k: int, num_samples: int, depth: int, weight_decay: float, feature_decay: float) -> float:
    """argmin over s >= 0 of the UFM objective restricted to class k's direction, by a dense grid then ternary
    search: with every W_m of singular value s along the class and h_k the ridge solution given W,
    f(s) = n_k lambda_H / (2 (s^2M + N lambda_H)) + M lambda_W s^2 / 2 (derived by hand, independent of the code)."""
    def f(s):
        return n_k * feature_decay / (2 * (s ** (2 * depth) + num_samples * feature_decay)) \
            + depth * weight_decay * s * s / 2

    grid = [i * 1e-3 for i in range(20001)]
    best = min(grid, key=f)
    lo, hi = max(best - 1e-3, 0.0), best + 1e-3
    for _ in range(100):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if f(a) <= f(b) else (a, hi)
    return (lo + hi) / 2


def test_partial_products_compose_to_the_logits():
    torch.manual_seed(0)
    model = DeepLinearClassifier(5, 3, hidden=4, depth_relu=2, depth_linear=3, bias=True, batchnorm=False).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    logits = model(x)
    inputs, products = model.linear_inputs(x), model.partial_products()
    assert len(inputs) == len(products) == 3
    w1, w2, w3 = (layer.weight for layer in model.linear)
    naive = [w3 @ w2 @ w1, w3 @ w2, w3]
    for m in range(3):
        torch.testing.assert_close(products[m], naive[m])
        torch.testing.assert_close(inputs[m] @ products[m].T + model.linear[-1].bias, logits)
    assert model.linear[0].bias is None and model.linear[1].bias is None  # the hidden linear layers are bias-free
    with pytest.raises(ValueError, match=r"inputs must be \(batch, 5\)"):
        model(torch.zeros(2, 6))


def test_ufm_objective_equals_a_hand_computation():
    solution = solve_ufm((2, 1), hidden=3, depth=2, num_iterations=1, weight_decay=0.1, feature_decay=0.2)
    model, labels = solution.model, solution.labels
    h, (w1, w2) = model.H.detach(), (layer.weight.detach() for layer in model.linear)
    total = 0.0
    for i in range(3):  # naive per-sample loop
        out = w2 @ (w1 @ h[i])
        target = torch.eye(2, dtype=torch.float64)[labels[i]]
        total += ((out - target) ** 2).sum() / (2 * 3)
    total += 0.1 / 2 * (w1.square().sum() + w2.square().sum()) + 0.2 / 2 * h.square().sum()
    torch.testing.assert_close(ufm_objective(model, labels, "mse", 0.1, 0.2), total)


@pytest.fixture(scope="module")
def imbalanced_m1():
    return solve_ufm(COUNTS, hidden=8, depth=1, num_iterations=4000)


def test_learned_norms_equal_the_scalar_optimum(imbalanced_m1):
    """SGD from the official initialisation reaches the per-class optimum: ||w_k|| = s_k, ||h_k|| = s_k /
    (s_k^2 + N lambda_H), for the official counts and decays (within 1 %)."""
    model, labels = imbalanced_m1.model, imbalanced_m1.labels
    n = sum(COUNTS)
    s = torch.tensor([scalar_optimum(n_k, n, 1, 5e-4, 5e-4) for n_k in COUNTS], dtype=torch.float64)
    rows = model.linear[0].weight.detach().norm(dim=1)
    means = torch.stack([model.H.detach()[labels == k].mean(0) for k in range(4)]).norm(dim=1)
    torch.testing.assert_close(rows, s, rtol=0.01, atol=0)
    torch.testing.assert_close(means, s / (s ** 2 + n * 5e-4), rtol=0.01, atol=0)
    # the hand-derived M = 1 form of the notes: ||w_k||^2 = sqrt(n_k lambda_H / lambda_W) - N lambda_H
    torch.testing.assert_close(s ** 2, torch.tensor([n_k ** 0.5 - n * 5e-4 for n_k in COUNTS],
                                                     dtype=torch.float64), rtol=1e-6, atol=0)


def test_minority_collapse_where_the_condition_says():
    """lambda = 0.02, N = 400: the threshold N^2 lambda^2 = 64 lies between the 50- and 100-sample classes, so the
    two 50-sample classes (and only they) lose their classifier rows and feature means."""
    solution = solve_ufm(COUNTS, hidden=8, depth=1, weight_decay=0.02, feature_decay=0.02, num_iterations=1500)
    rows = solution.model.linear[0].weight.detach().norm(dim=1)
    assert sum(COUNTS) ** 2 * 0.02 * 0.02 == pytest.approx(64)
    assert rows[2:].max() < 0.01 * rows[:2].min()
    expected = [scalar_optimum(n_k, 400, 1, 0.02, 0.02) for n_k in COUNTS]
    assert expected[2:] == [pytest.approx(0, abs=1e-6)] * 2
    torch.testing.assert_close(rows[:2], torch.tensor(expected[:2], dtype=torch.float64), rtol=0.01, atol=0)


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_closed_form_equals_the_scalar_optimum(depth):
    """The core's `imbalanced_geometry` (the official compute_x / compute_s) against the scalar minimisation."""
    imbalanced_geometry = pytest.importorskip("hfpapers.analysis").imbalanced_geometry

    s = imbalanced_geometry(COUNTS, depth, 5e-4, 5e-4).s
    expected = [scalar_optimum(n_k, sum(COUNTS), depth, 5e-4, 5e-4) for n_k in COUNTS]
    torch.testing.assert_close(torch.as_tensor(s, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


def test_ufm_collapses_to_the_predicted_frames(imbalanced_m1):
    """NC1 -> 0 and NC2 / NC3 -> 0 against the general orthogonal frame (imbalanced, MSE), the orthogonal frame
    (balanced, MSE bias-free) and the simplex ETF (balanced, CE); the wrong frame stays far."""
    pytest.importorskip("hfpapers.analysis")  # the core toolkit (written alongside this record)
    from hfpapers.methods.nc_deep_linear.experiments import ufm_layer_metrics

    geometry = {"counts": COUNTS, "weight_decay": 5e-4, "feature_decay": 5e-4}
    (gof,) = ufm_layer_metrics(imbalanced_m1.model, imbalanced_m1.labels, frame="general-orthogonal", **geometry)
    (ortho_on_imbalanced,) = ufm_layer_metrics(imbalanced_m1.model, imbalanced_m1.labels, frame="orthogonal")
    balanced = solve_ufm((100,) * 4, hidden=8, depth=1, num_iterations=4000)
    (ortho,) = ufm_layer_metrics(balanced.model, balanced.labels, frame="orthogonal")
    (etf_on_mse,) = ufm_layer_metrics(balanced.model, balanced.labels, frame="etf")
    ce = solve_ufm((100,) * 4, hidden=8, depth=1, loss="ce", num_iterations=4000)
    (etf,) = ufm_layer_metrics(ce.model, ce.labels, frame="etf")
    for metrics in (gof, ortho, etf):
        for name, value in metrics.items():
            if name.startswith(("nc1", "nc2", "nc3")):
                assert value < 0.02, (name, value)
    assert ortho_on_imbalanced["nc2_w"] > 0.05 and etf_on_mse["nc2_w"] > 0.3


@pytest.mark.parametrize("preset", ["ufm-balanced", "ufm-imbalanced-M1", "ufm-imbalanced-M3", "ufm-imbalanced-M6",
                                    "ufm-imbalanced-M9"])
def test_paper_presets_do_not_diverge(preset):
    """The official lr 0.1 and init N(0, 0.1^2) diverge within 6 iterations at d = 2048 for M >= 3: every paper
    preset must start to converge (its first 20 iterations, where a divergence shows, lower the objective)."""
    import hfpapers

    config = NcDeepLinearConfig(**hfpapers.get_method("nc-deep-linear").preset(preset))
    for depth in config.depths:
        objectives = [solve_ufm(config.imbalanced_counts, hidden=config.hidden, depth=depth, num_iterations=n,
                                learning_rate=config.learning_rate, init_std=config.init_std).objective
                      for n in (1, 20)]
        assert objectives[1] < objectives[0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="each with at least one sample"):
        NcDeepLinearConfig(imbalanced_counts=(3, 0))
    with pytest.raises(ValueError, match="K=4 classes but hidden=2"):
        NcDeepLinearConfig(hidden=2)
    with pytest.raises(ValueError, match="at least two classes, each with at least one sample"):
        solve_ufm((5,), hidden=4, depth=1)
    with pytest.raises(ValueError, match="hidden >= K"):
        solve_ufm((5, 5, 5), hidden=2, depth=1)


def test_runner_end_to_end(tmp_path):
    """`hfpapers run nc-deep-linear` on a freshly built tiny Scaling MLP: results.json, PNGs, README, the table of
    measured vs predicted norms."""
    pytest.importorskip("hfpapers.analysis")
    import hfpapers
    from hfpapers.runs import run

    folder = tmp_path / "model"
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=4)
    model.save_pretrained(folder)
    hfpapers.get_method("scaling-mlp").resolve("tiny").processor_factory(model.config).save_pretrained(folder)
    settings = {"num_examples": 64, "hidden": 8, "depths": (1,), "num_iterations": 100, "record_every": 50,
                "digits_epochs": 1, "digits_width": 16, "digits_depth_relu": 1, "digits_depth_linear": 2}
    result = run("nc-deep-linear", str(folder), str(tmp_path / "out"), dataset="shapes",
                 dataset_kwargs={"resolution": 16, "num_train": 64, "num_test": 16, "num_classes": 4},
                 settings=settings)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(result.metrics)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert "predicted" in (tmp_path / "out" / "README.md").read_text()
