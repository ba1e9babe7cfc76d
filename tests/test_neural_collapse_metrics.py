"""The neural-collapse toolkit (hfpapers/analysis/neural_collapse.py): statistics against a naive per-sample loop,
hand-made collapsed geometries, the imbalanced closed form against a direct minimisation of the deep-linear UFM,
the reduction across 2 gloo processes, bad input, the `evaluate` module and the engine callback."""

import json
import math
import time

import numpy as np
import pytest
import torch

from conftest import REPO, SMALL_SHAPES
from hfpapers.analysis.neural_collapse import (
    ClassStatistics,
    NearestClassCentre,
    classification_head,
    collapse_metrics,
    imbalanced_geometry,
    layer_collapse_metrics,
    nc1,
    nc1_trace_ratio,
    orthogonal_frame,
    partial_products,
    simplex_etf,
)


def random_features(n=90, d=7, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % K
    features = 3 * torch.randn(K, d, generator=g)[labels] + torch.randn(n, d, generator=g)
    return features, labels


def naive(features, labels, K, weight, bias=None):
    """Every quantity from its definition, one sample at a time, in numpy."""
    H, y, W = np.asarray(features, np.float64), np.asarray(labels), np.asarray(weight, np.float64)
    n, d = H.shape
    means = np.zeros((K, d))
    for h, k in zip(H, y):
        means[k] += h / np.sum(y == k)
    mu_g = H.mean(0)
    sigma_w = np.zeros((d, d))
    for h, k in zip(H, y):
        sigma_w += np.outer(h - means[k], h - means[k]) / n
    sigma_b = sum(np.outer(m - mu_g, m - mu_g) for m in means) / K
    M = (means - mu_g) if bias is not None else means  # centred for the ETF (bias), not for the orthogonal frame
    frame = (np.eye(K) - 1 / K) / np.sqrt(K - 1) if bias is not None else np.eye(K) / np.sqrt(K)

    def dist(a, b):
        return np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b))

    logits = H @ W.T + (0 if bias is None else np.asarray(bias))
    mismatch = 0
    for h, z in zip(H, logits):
        mismatch += int(np.argmax(z) != np.argmin([np.linalg.norm(h - m) for m in means]))
    return {"sigma_w": sigma_w, "sigma_b": sigma_b, "means": means,
            "nc1": np.trace(sigma_w @ np.linalg.pinv(sigma_b)) / K,
            "nc1_trace_ratio": np.trace(sigma_w) / np.trace(sigma_b),
            "nc2_w": dist(W @ W.T, frame), "nc2_h": dist(M @ M.T, frame), "nc3": dist(W, M),
            "nc3_wh": dist(W @ M.T, frame), "nc4": mismatch / n}


# ------------------------------------------------------------------ statistics and metrics


@pytest.mark.parametrize("with_bias", [False, True])
def test_streamed_statistics_and_metrics_match_a_naive_loop(with_bias):
    features, labels = random_features()
    K = 3
    weight = torch.randn(K, features.shape[1], generator=torch.Generator().manual_seed(1))
    bias = torch.tensor([0.3, -0.2, 0.1]) if with_bias else None
    stats = ClassStatistics(K)
    for rows in torch.arange(len(labels)).split(16):  # streamed in batches
        stats.update(features[rows], labels[rows])
    nc4 = NearestClassCentre(stats.class_means, weight, bias)
    for rows in torch.arange(len(labels)).split(25):
        nc4.update(features[rows])
    expected = naive(features, labels, K, weight, bias)
    assert stats.within_covariance.numpy() == pytest.approx(expected["sigma_w"], abs=1e-10)
    assert stats.between_covariance.numpy() == pytest.approx(expected["sigma_b"], abs=1e-10)
    assert stats.class_means.numpy() == pytest.approx(expected["means"], abs=1e-12)
    got = collapse_metrics(stats, weight, bias, nc4=nc4)
    assert got == pytest.approx({k: expected[k] for k in got}, rel=1e-8)
    assert got["nc1"] > 0.01 and got["nc1_trace_ratio"] > 0.01  # random features are not collapsed


def orthonormal_rows(K, d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # [K, d], orthonormal rows


def test_collapsed_features_score_zero_against_their_own_frame_only():
    K, d, per_class = 4, 6, 5
    labels = torch.arange(K).repeat_interleave(per_class)
    U = orthonormal_rows(K, d)
    # Orthogonal frame (bias-free): every sample on its class mean, means orthogonal and of equal length, W ∝ means.
    features = 2.0 * U[labels]
    stats = ClassStatistics.from_features(features, labels, K)
    weight = 0.7 * U
    nc4 = NearestClassCentre(stats.class_means, weight)
    nc4.update(features)
    got = collapse_metrics(stats, weight, nc4=nc4)
    assert max(got.values()) < 1e-10, got
    # The wrong frame is far for W (centred, equal orthogonal means do form an ETF: nc2_h alone cannot tell).
    assert collapse_metrics(stats, weight, frame="etf")["nc2_w"] > 0.3
    # Simplex ETF (with bias): means = ETF vectors plus a global offset, W = the centred means.
    P = torch.eye(K, dtype=torch.float64) - 1 / K  # a projector: the rows of P / (K-1)^(1/4) have Gram P / sqrt(K-1)
    vectors = P / (K - 1) ** 0.25 @ U  # [K, d]: K equal-norm vectors at cosine -1/(K-1)
    assert (vectors @ vectors.T).numpy() == pytest.approx(simplex_etf(K).numpy(), abs=1e-12)
    offset = torch.randn(d, dtype=torch.float64)
    features = 3.0 * vectors[labels] + offset
    stats = ClassStatistics.from_features(features, labels, K)
    bias = 0.5 - vectors @ offset  # a collapsed head's bias absorbs W mu_G
    nc4 = NearestClassCentre(stats.class_means, vectors, bias)
    nc4.update(features)
    got = collapse_metrics(stats, vectors, bias, nc4=nc4)
    assert max(got.values()) < 1e-10, got
    assert min(collapse_metrics(stats, vectors, frame="orthogonal")[k] for k in ("nc2_w", "nc2_h")) > 0.3


def test_frames_are_unit_norm_with_their_gram_structure():
    for K in (2, 5):
        assert torch.linalg.matrix_norm(simplex_etf(K)) == pytest.approx(1.0)
        assert torch.linalg.matrix_norm(orthogonal_frame(K)) == pytest.approx(1.0)
        assert simplex_etf(K).sum(1) == pytest.approx(torch.zeros(K, dtype=torch.float64), abs=1e-12)
        cos = simplex_etf(K)[0, 1] / simplex_etf(K)[0, 0]
        assert float(cos) == pytest.approx(-1 / (K - 1))


def test_partial_products_chain_the_layers_top_down():
    g = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(5, 6), (4, 5), (3, 4)])
    products = partial_products([w1, w2, w3])
    expected = [w3 @ w2 @ w1, w3 @ w2, w3]
    for got, want in zip(products, expected):
        assert got.numpy() == pytest.approx(want.numpy(), rel=1e-10)
    with pytest.raises(ValueError, match="do not chain"):
        partial_products([w1, w3])


# ------------------------------------------------------------------ the imbalanced closed form


def test_minority_collapse_where_the_one_layer_condition_says():
    """M = 1: x_k = sqrt(n_k) / (N sqrt(lambda_W lambda_H)) - 1, zero iff n_k <= N^2 lambda_W lambda_H."""
    counts = [200, 100, 50, 50]
    N, lam = 400, math.sqrt(75) / 400  # N^2 lambda^2 = 75: the two classes of 50 collapse, 100 and 200 do not
    geometry = imbalanced_geometry(counts, 1, lam, lam)
    expected = [max(math.sqrt(n) / (N * lam) - 1, 0.0) for n in counts]
    assert geometry.x.tolist() == pytest.approx(expected, rel=1e-9)
    assert geometry.s[2:].tolist() == [0.0, 0.0] and all(geometry.s[:2] > 0)


def test_deep_closed_form_keeps_the_global_minimum_where_a_nonzero_root_is_only_local():
    """M = 2, lambda = 0.015, n = [200, 100, 50, 50]: the root equation still has a positive root for the classes of
    50 (the official code's `compute_x` keeps it), but the per-class UFM objective under the collapsed ansatz,
    (n_k/2N)(s^M a - 1)^2 + (lambda_H n_k/2) a^2 + M lambda_W s^2/2, minimised over a grid of (s, a), is lowest at
    s = 0 for them and at the closed form's s_k for the others."""
    counts, M, lam = [200, 100, 50, 50], 2, 0.015
    N = sum(counts)
    geometry = imbalanced_geometry(counts, M, lam, lam)
    s_grid, a_grid = np.meshgrid(np.linspace(0, 3, 1501), np.linspace(0, 1, 2001), indexing="ij")
    for n_k, s_k in zip(counts, geometry.s.tolist()):
        f = n_k / (2 * N) * (s_grid**M * a_grid - 1) ** 2 + lam * n_k / 2 * a_grid**2 + M * lam / 2 * s_grid**2
        best = s_grid.flat[f.argmin()]
        assert best == pytest.approx(s_k, abs=5e-3), (n_k, best, s_k)
    assert geometry.s[2:].tolist() == [0.0, 0.0] and all(geometry.s[:2] > 0)


@pytest.mark.parametrize("depth", [1, 2])
def test_imbalanced_closed_form_matches_a_direct_minimisation(depth):
    """Full-batch GD (momentum) on ||W_M...W_1 H - Y||^2/(2N) + lambda_W/2 sum ||W_m||^2 + lambda_H/2 ||H||^2 with
    n = [200, 100, 50, 50], d = 16: every layer's singular values, the class-mean lengths and the NC metrics
    against the general orthogonal frame (of the full product and each partial product) match the closed form."""
    started = time.perf_counter()
    counts, K, d, lam = [200, 100, 50, 50], 4, 16, 5e-3
    N = sum(counts)
    labels = torch.arange(K).repeat_interleave(torch.tensor(counts))
    Y = torch.nn.functional.one_hot(labels, K).double().T
    g = torch.Generator().manual_seed(0)
    H = (0.5 * torch.randn(d, N, generator=g, dtype=torch.float64)).requires_grad_()
    shapes = [(d, d)] * (depth - 1) + [(K, d)]
    weights = [(0.5 * torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_() for s in shapes]
    params = [H, *weights]
    velocities = [torch.zeros_like(p) for p in params]
    for _ in range(1000):  # heavy ball by hand: torch.optim's first step imports torch._dynamo (seconds)
        out = H
        for w in weights:
            out = w @ out
        loss = ((out - Y) ** 2).sum() / (2 * N) + lam / 2 * sum((w**2).sum() for w in weights) + lam / 2 * (H**2).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, v, grad in zip(params, velocities, grads):
                v.mul_(0.9).add_(grad)
                p.sub_(0.1 * v)
    weights = [w.detach() for w in weights]
    geometry = imbalanced_geometry(counts, depth, lam, lam)
    for w in weights:
        assert torch.linalg.svdvals(w)[:K].numpy() == pytest.approx(geometry.s.numpy(), rel=1e-3)
    stats = ClassStatistics.from_features(H.detach().T, labels, K)
    assert stats.class_means.norm(dim=1).numpy() == pytest.approx(geometry.feature_scale.numpy(), rel=1e-3)
    layer_inputs = [H.detach()]
    for w in weights[:-1]:
        layer_inputs.append(w @ layer_inputs[-1])
    per_layer = layer_collapse_metrics([ClassStatistics.from_features(h.T, labels, K) for h in layer_inputs],
                                       weights, geometry=geometry)
    for metrics in per_layer:
        assert max(metrics.values()) < 5e-3, metrics
    # The balanced frame is not the optimum here: the imbalance shows against it.
    assert collapse_metrics(stats, partial_products(weights)[0])["nc2_w"] > 0.05
    assert time.perf_counter() - started < 10


# ------------------------------------------------------------------ bad input


def test_bad_input_gets_one_clear_error_each():
    features, labels = random_features(n=12, d=5, K=3)
    with pytest.raises(ValueError, match="mismatched counts: 12 feature rows but 11 labels"):
        ClassStatistics(3).update(features, labels[:11])
    with pytest.raises(ValueError, match=r"fewer samples \(2\) than classes \(3\)"):
        nc1(ClassStatistics.from_features(features[:2], labels[:2], 3))
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        nc1_trace_ratio(ClassStatistics.from_features(features[labels < 2], labels[labels < 2], 3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ClassStatistics(3).update(features, labels + 1)
    wide, wide_labels = random_features(n=24, d=3, K=6)
    stats = ClassStatistics.from_features(wide, wide_labels, 6)
    with pytest.raises(ValueError, match="orthogonal frame of K=6 classes needs feature dimension d >= K, got d=3"):
        collapse_metrics(stats, torch.randn(6, 3))
    with pytest.raises(ValueError, match="simplex ETF of K=6 classes needs feature dimension >= K-1, got d=3"):
        collapse_metrics(stats, torch.randn(6, 3), torch.zeros(6))
    geometry = imbalanced_geometry([4] * 6, 1, 1e-3, 1e-3)
    with pytest.raises(ValueError, match="general-orthogonal frame of K=6 classes needs feature dimension d >= K"):
        collapse_metrics(stats, torch.randn(6, 3), geometry=geometry)
    with pytest.raises(ValueError, match=r"weight must be \[num_classes=3, feature_dim=5\]"):
        collapse_metrics(ClassStatistics.from_features(features, labels, 3), torch.randn(3, 4))
    with pytest.raises(ValueError, match="no features were accumulated"):
        ClassStatistics(3).reduce()
    with pytest.raises(ValueError, match="at least one sample each"):
        imbalanced_geometry([10, 0], 1, 1e-3, 1e-3)


# ------------------------------------------------------------------ across processes


def _two_process_worker(rank, init_file, out_dir, features, labels):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        rows = order[:20] if rank == 0 else order[20:]  # uneven shards
        stats = ClassStatistics(3)
        for batch in rows.split(7):
            stats.update(features[batch], labels[batch])
        reduced = stats.reduce()
        torch.save({"nc1": nc1(reduced), "sigma_w": reduced.within_covariance, "counts": reduced.counts,
                    "local": stats.counts}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_reduce_over_two_gloo_processes_gives_the_one_process_numbers(tmp_path):
    features, labels = random_features(n=60, d=5, K=3)
    # fork, not spawn: two fresh interpreters would spend seconds importing torch
    torch.multiprocessing.start_processes(_two_process_worker, nprocs=2, join=True, start_method="fork",
                                          args=(str(tmp_path / "init"), str(tmp_path), features, labels))
    single = ClassStatistics.from_features(features, labels, 3)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["local"].sum().item() for r in results] == [20, 40]  # each process saw only its shard
    for r in results:
        assert r["counts"].tolist() == single.counts.tolist()
        assert r["sigma_w"].numpy() == pytest.approx(single.within_covariance.numpy(), abs=1e-12)
        assert r["nc1"] == pytest.approx(nc1(single), rel=1e-12)


# ------------------------------------------------------------------ the evaluate module


def test_evaluate_module_loads_offline_and_matches_the_naive_loop():
    import evaluate

    features, labels = random_features(n=30, d=5, K=3, seed=3)
    weight, bias = torch.randn(3, 5, generator=torch.Generator().manual_seed(4)), [0.1, 0.0, -0.1]
    module = evaluate.load(str(REPO / "evaluation" / "metrics" / "neural_collapse"))
    got = module.compute(features=features.tolist(), labels=labels.tolist(), weight=weight.tolist(), bias=bias)
    expected = naive(features, labels, 3, weight, bias)
    assert got == pytest.approx({k: expected[k] for k in got}, rel=1e-6)
    assert set(got) == {"nc1", "nc1_trace_ratio", "nc2_w", "nc2_h", "nc3", "nc3_wh", "nc4"}
    # An imbalanced optimum built by hand from its lengths (class k on direction u_k, ||w_k|| = s_k^M,
    # ||h_k|| = s_k^M / (s_k^2M + N lambda_H)): zero against the general orthogonal frame of the labels' counts.
    counts, lam = [6, 3, 2], 1e-2
    geometry = imbalanced_geometry(counts, 1, lam, lam)
    U = orthonormal_rows(3, 5, seed=2)
    labels = torch.arange(3).repeat_interleave(torch.tensor(counts))
    features = (geometry.s / (geometry.s**2 + sum(counts) * lam))[:, None] * U
    got = module.compute(features=features[labels].tolist(), labels=labels.tolist(),
                         weight=(geometry.s[:, None] * U).tolist(), frame="general-orthogonal", lambda_w=lam,
                         lambda_h=lam)
    assert max(got.values()) < 1e-10, got


# ------------------------------------------------------------------ the engine callback


def test_classification_head_is_found_or_refused():
    from transformers import PretrainedConfig

    class Classifier(torch.nn.Module):
        def __init__(self, hidden, num_labels):
            super().__init__()
            self.config = PretrainedConfig(num_labels=num_labels)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU())
            self.classifier = torch.nn.Linear(hidden, 3)

    model = Classifier(8, 3)
    assert classification_head(model) is model.classifier
    with pytest.raises(ValueError, match="no nn.Linear with out_features == num_labels=5"):
        classification_head(Classifier(8, 5))
    with pytest.raises(ValueError, match="is not a classifier"):
        classification_head(torch.nn.Linear(4, 3))


def test_training_flag_records_nc_metrics_each_epoch_and_plots_them(tmp_path):
    """`hfpapers train scaling-mlp --preset tiny --neural-collapse` for 2 epochs: NC1-NC4 per epoch in
    metrics.jsonl and neural_collapse.png; the last epoch's values equal a naive recomputation on the saved model."""
    import transformers

    from hfpapers import data
    from hfpapers.cli import main
    from hfpapers.registry import get_method, load_pretrained

    out = tmp_path / "run"
    options = [a for k, v in SMALL_SHAPES.items() for a in ("--dataset-option", f"{k}={v}")]
    assert main(["train", "scaling-mlp", "--preset", "tiny", "--output-dir", str(out), "--epochs", "2",
                 "--no-progress", "--neural-collapse", *options]) in (0, None)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in r]
    keys = ["eval_nc1", "eval_nc1_trace_ratio", "eval_nc2_w", "eval_nc2_h", "eval_nc3", "eval_nc3_wh", "eval_nc4"]
    assert [r["epoch"] for r in evals] == [1, 2] and all(k in r for r in evals for k in keys)
    assert (out / "neural_collapse.png").read_bytes()[:4] == b"\x89PNG"

    model = load_pretrained(get_method("scaling-mlp"), str(out)).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    test = data.load("shapes", seed=0, **SMALL_SHAPES)["test"]
    pixels = torch.as_tensor(processor(list(test["image"]), return_tensors="np")["pixel_values"])
    head = model.linear_out
    captured = []
    head.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    with torch.no_grad():
        model(pixel_values=pixels)
    expected = naive(captured[0], test["label"], SMALL_SHAPES["num_classes"], head.weight.detach(),
                     head.bias.detach())
    assert {k: evals[-1][f"eval_{k}"] for k in expected if f"eval_{k}" in evals[-1]} == pytest.approx(
        {k: expected[k] for k in ("nc1", "nc1_trace_ratio", "nc2_w", "nc2_h", "nc3", "nc3_wh", "nc4")}, rel=1e-4)
