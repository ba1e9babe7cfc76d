"""Perturbation Analysis of Neural Collapse (nc-perturbation): each claim against a closed form, autograd or a
finite difference, on small seeded problems."""

import json
import math

import pytest
import torch

from hfpapers.analysis import ClassStatistics, nc1_trace_ratio
from hfpapers.methods.nc_perturbation import (block_singular_values, central_path_flow, central_path_velocity,
                                              collapsed_minimizer, first_order_map, optimal_classifier,
                                              perturbation_objective, solve_perturbation_model, targets,
                                              theorem_4_2)

LAMBDA_W, LAMBDA_H = math.sqrt(2), 0.1  # the paper's Fig. 1 lambda_W
K, D, N_PER = 4, 10, 10  # the paper's Fig. 1 sizes


def noisy_minimizer(seed=0, noise=0.1):
    generator = torch.Generator().manual_seed(seed)
    W, H, labels = collapsed_minimizer(K, D, N_PER, LAMBDA_W, LAMBDA_H, generator)
    return W, H, H + noise * torch.randn(H.shape, dtype=torch.float64, generator=generator), labels


def trace_ratio(H, labels):
    return nc1_trace_ratio(ClassStatistics.from_features(H.T, labels, K))


def test_optimal_classifier_zeroes_the_W_gradient_and_collapsed_minimiser_is_thm_2_1():
    W, H, H0, labels = noisy_minimizer()
    Y = targets(labels, K)
    W_star = optimal_classifier(H0, Y, LAMBDA_W).requires_grad_()
    perturbation_objective(W_star, H0, H0, Y, LAMBDA_W, LAMBDA_H, 5.0).backward()
    assert W_star.grad.abs().max() < 1e-12
    # Thm 2.1 by hand: ||h_k||^2 = rho = (1 - sqrt(lw lh)) sqrt(lw / lh), orthogonal means, w_k = sqrt(lh/lw) h_k
    rho = (1 - math.sqrt(LAMBDA_W * LAMBDA_H)) * math.sqrt(LAMBDA_W / LAMBDA_H)
    means = H[:, ::N_PER]
    torch.testing.assert_close(means.T @ means, rho * torch.eye(K, dtype=torch.float64))
    torch.testing.assert_close(W, math.sqrt(LAMBDA_H / LAMBDA_W) * means.T)
    # ...and it is a stationary point of the UFM objective (Eq. 1) in both W and H
    Wg, Hg = W.clone().requires_grad_(), H.clone().requires_grad_()
    perturbation_objective(Wg, Hg, H, Y, LAMBDA_W, LAMBDA_H, 0.0).backward()
    assert Wg.grad.abs().max() < 1e-12 and Hg.grad.abs().max() < 1e-12


def test_solver_finds_a_stationary_point_and_keeps_a_collapsed_H0():
    W, H, H0, labels = noisy_minimizer()
    Y = targets(labels, K)
    kept = solve_perturbation_model(H, labels, K, LAMBDA_W, LAMBDA_H, beta=3.0)  # Cor. 2.2: H0 is the minimiser
    torch.testing.assert_close(kept.H, H)
    torch.testing.assert_close(kept.W, W)
    solution = solve_perturbation_model(H0, labels, K, LAMBDA_W, LAMBDA_H, beta=3.0, tolerance=1e-12)
    Wg, Hg = solution.W.clone().requires_grad_(), solution.H.clone().requires_grad_()
    value = perturbation_objective(Wg, Hg, H0, Y, LAMBDA_W, LAMBDA_H, 3.0)
    value.backward()
    assert Wg.grad.abs().max() < 1e-10 and Hg.grad.abs().max() < 1e-10
    for seed in range(3):  # and a minimum: random nearby points are higher
        step = 1e-3 * torch.randn(H0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert perturbation_objective(solution.W, solution.H + step, H0, Y, LAMBDA_W, LAMBDA_H, 3.0) > value


def test_large_beta_is_an_implicit_gradient_step_and_lowers_nc1():
    """Eq. 2 = one implicit step of size 1/beta along Eq. 4: the gap to the explicit step shrinks as 1/beta^2, and
    the trace ratio of H* falls below H0's (Cor. 3.2)."""
    _, _, H0, labels = noisy_minimizer(seed=1, noise=0.5)
    velocity = central_path_velocity(H0, targets(labels, K), LAMBDA_W, LAMBDA_H)
    gaps = []
    for beta in (100.0, 200.0):
        solution = solve_perturbation_model(H0, labels, K, LAMBDA_W, LAMBDA_H, beta, tolerance=1e-13)
        gaps.append(float((solution.H - (H0 + velocity / beta)).norm()))
        assert trace_ratio(solution.H, labels) < trace_ratio(H0, labels)
    assert 3.5 < gaps[0] / gaps[1] < 4.5


def test_central_path_follows_theorem_3_1():
    _, _, H0, labels = noisy_minimizer(seed=2, noise=0.5)
    times = [0.5 * i for i in range(9)]
    path = central_path_flow(H0, labels, K, LAMBDA_W, LAMBDA_H, times)
    # the integrator against a fine explicit Euler run of the same ODE
    H = H0.clone()
    for _ in range(4000):
        H = H + 1e-3 * central_path_velocity(H, targets(labels, K), LAMBDA_W, LAMBDA_H)
    assert float((path[-1] - H).norm() / H.norm()) < 1e-3
    stats = [ClassStatistics.from_features(H.T, labels, K) for H in path]
    ratio = [nc1_trace_ratio(s) for s in stats]
    within = [math.exp(2 * LAMBDA_H * t) * float(s.within_covariance.trace()) for t, s in zip(times, stats)]
    between = [math.exp(2 * LAMBDA_H * t) * float(s.between_covariance.trace()) for t, s in zip(times, stats)]
    assert all(b < a for a, b in zip(ratio, ratio[1:]))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(within, within[1:]))
    assert all(b > a for a, b in zip(between, between[1:]))


def test_first_order_map_matches_finite_differences_and_theorem_4_2():
    W, H, _, labels = noisy_minimizer()
    beta = 100.0
    F = first_order_map(W, H, labels, K, LAMBDA_W, LAMBDA_H, beta)
    direction = torch.randn(H.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eps = 1e-6
    moved = solve_perturbation_model(H + eps * direction, labels, K, LAMBDA_W, LAMBDA_H, beta, tolerance=1e-15).H
    predicted = (F @ direction.T.reshape(-1)).reshape(-1, D).T
    assert float(((moved - H) / eps - predicted).norm() / predicted.norm()) < 1e-6
    measured, theory = block_singular_values(F, labels, D), theorem_4_2(LAMBDA_W, LAMBDA_H, beta)
    # Thm 4.2 by hand: 1 - sigma_min = sqrt(lh/lw)/beta, sigma_max(F_kk') = 2 lh (1 - sqrt(lh lw)) / beta
    assert theory["intra_min"] == pytest.approx(1 - math.sqrt(LAMBDA_H / LAMBDA_W) / beta)
    assert measured["intra_max"] == pytest.approx(1.0, abs=1e-9)
    assert 1 - measured["intra_min"] == pytest.approx(math.sqrt(LAMBDA_H / LAMBDA_W) / beta, rel=0.01)
    expected_inter = 2 * LAMBDA_H * (1 - math.sqrt(LAMBDA_H * LAMBDA_W)) / beta
    assert measured["inter_max"] == pytest.approx(expected_inter, rel=0.01)
    assert measured["inter_second"] < 1e-12 * measured["inter_max"]  # rank 1


@pytest.mark.parametrize(("labels", "message"), [
    (torch.tensor([0, 0, 1, 1, 1, 1]), r"classes \[2\] have none"),
    (torch.tensor([0, 1, 2]), "labels must be N=6 integer class ids"),
    (torch.tensor([0.0, 1, 2, 0, 1, 2]), "labels must be N=6 integer class ids"),
    (torch.tensor([0, 1, 3, 0, 1, 2]), r"labels must lie in \[0, 3\)"),
])
def test_bad_features_are_one_clear_error(labels, message):
    with pytest.raises(ValueError, match=message):
        solve_perturbation_model(torch.randn(5, 6, dtype=torch.float64), labels, 3, 1.0, 0.1, 10.0)


def test_collapsed_minimiser_refuses_what_thm_2_1_excludes():
    with pytest.raises(ValueError, match="lambda_H \\* lambda_W < 1"):
        collapsed_minimizer(3, 5, 2, 2.0, 0.6)
    with pytest.raises(ValueError, match="feature_dim >= K"):
        collapsed_minimizer(6, 5, 2, 1.0, 0.1)


def test_runner_reports_every_part_on_a_tiny_classifier(tmp_path):
    """The whole report on a tiny Scaling MLP; its layer-wise part checks §5's claim (NC1 falls per added layer)."""
    import hfpapers
    from hfpapers.registry import create_processor
    from hfpapers.runs import run

    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=4)
    model.save_pretrained(tmp_path / "model")
    create_processor("scaling-mlp", model.config).save_pretrained(tmp_path / "model")
    settings = {"num_examples": 40, "betas": (1.0, 1000.0), "spectrum_lambda_H": (0.1,), "flow_points": 3,
                "flow_time": 1.0, "layerwise_layers": 3, "layerwise_width": 32, "layerwise_epochs": 60}
    result = run("nc-perturbation", tmp_path / "model", tmp_path / "out", dataset="shapes",
                 dataset_kwargs={"resolution": 16, "num_train": 40, "num_test": 8, "num_classes": 4},
                 settings=settings)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    sweep = saved["details"]["beta_sweep"]
    assert [r["beta"] for r in sweep] == [1.0, 1000.0] and all(r["stationarity"] < 1e-9 for r in sweep)
    assert sweep[-1]["trace_ratio_H"] < sweep[-1]["trace_ratio_H0"]
    assert result.metrics["theorem_4_2_max_relative_error"] < 0.01
    for figure in ("nc1_vs_beta.png", "first_order_map_spectrum.png", "central_path.png", "layerwise_nc1.png"):
        assert (tmp_path / "out" / figure).read_bytes()[:4] == b"\x89PNG"
    layers = saved["details"]["layerwise"]
    assert layers[0]["nc1"] > layers[1]["nc1"] > layers[2]["nc1"] and layers[-1]["accuracy"] > 0.95
    assert "measured / Thm 4.2" in (tmp_path / "out" / "README.md").read_text()
