"""Mixup's influence on neural collapse (nc-mixup): the mixup / CutMix collator against hand computations, the UFM
optimum against a direct optimisation of the feature, the Fig. 1 projection against a hand-made frame, and small
seeded checks of the paper's two claims under a fixed simplex-ETF classifier."""

import json
import math

import numpy as np
import pytest
import torch

from hfpapers.augment import MixupCutmix
from hfpapers.methods.nc_mixup.config import NcMixupConfig
from hfpapers.methods.nc_mixup.geometry import optimal_mixup_logits, plane_projection, readout, scale_from_margin


def test_mixup_equals_a_hand_computed_mix():
    """One lambda per batch from the generator, a random permutation as partners, soft targets: written out
    with the same generator's draws, example by example."""
    images, labels = torch.randn(5, 2, 3, 3), torch.tensor([0, 2, 1, 2, 0])
    mixed = MixupCutmix(3, mixup_alpha=0.4, label_smoothing=0.1)(images, labels, torch.Generator().manual_seed(7))
    draws = torch.Generator().manual_seed(7)
    partner = torch.randperm(5, generator=draws)
    lam = np.random.default_rng(int(torch.randint(2**62, (1,), generator=draws))).beta(0.4, 0.4)
    for i in range(5):
        j = int(partner[i])
        assert torch.allclose(mixed.pixel_values[i], lam * images[i] + (1 - lam) * images[j], atol=1e-6)
        target = [0.1 / 3] * 3
        target_j = [0.1 / 3] * 3
        target[int(labels[i])] = 0.9 + 0.1 / 3
        target_j[int(labels[j])] = 0.9 + 0.1 / 3
        expected = [lam * a + (1 - lam) * b for a, b in zip(target, target_j)]
        assert mixed.targets[i].tolist() == pytest.approx(expected, abs=1e-6)
    assert mixed.lam.tolist() == pytest.approx([lam] * 5) and not mixed.cutmix
    logits = torch.randn(5, 3)
    ce = [-(mixed.targets[i] * logits[i].log_softmax(-1)).sum() for i in range(5)]
    assert float(mixed.loss(logits)) == pytest.approx(float(sum(ce) / 5), rel=1e-6)
    again = MixupCutmix(3, mixup_alpha=0.4, label_smoothing=0.1)(images, labels, torch.Generator().manual_seed(7))
    assert torch.equal(again.pixel_values, mixed.pixel_values)  # a resumed run draws the same


def test_cutmix_box_area_is_one_minus_lambda():
    """Each image gets a box of its partner (constant images tell the pixels apart); the weight is the share of
    its own pixels, and the targets follow it."""
    images = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 1, 11, 9).clone()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    partner = torch.tensor([1, 2, 3, 4, 5, 0])
    mixed = MixupCutmix(4, mixup_alpha=0.0, cutmix_alpha=1.0, per_example=True)(
        images, labels, torch.Generator().manual_seed(3), partner=partner)
    assert mixed.cutmix
    for i in range(6):
        from_partner = (mixed.pixel_values[i] == float(partner[i])).float().mean()
        assert ((mixed.pixel_values[i] == i) | (mixed.pixel_values[i] == float(partner[i]))).all()
        assert float(mixed.lam[i]) == pytest.approx(1 - float(from_partner))
        expected = torch.zeros(4, dtype=torch.float64)
        expected[labels[i]] += float(mixed.lam[i])
        expected[labels[partner[i]]] += 1 - float(mixed.lam[i])
        assert mixed.targets[i].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert len(set(mixed.lam.tolist())) > 1  # one weight per example


@pytest.mark.parametrize(("kwargs", "call", "message"), [
    ({"mixup_alpha": 0.0}, {}, "at least one above 0"),
    ({"label_smoothing": 1.0}, {}, "label_smoothing must lie in"),
    ({}, {"labels": torch.tensor([0, 5])}, r"labels must lie in \[0, 3\)"),
    ({}, {"images": torch.zeros(2, 4)}, r"\(batch, channels, height, width\)"),
    ({}, {"partner": torch.tensor([0, 2])}, "partner must be"),
])
def test_bad_mixing_inputs_are_one_clear_error(kwargs, call, message):
    images, labels = call.get("images", torch.zeros(2, 1, 2, 2)), call.get("labels", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=message):
        MixupCutmix(3, **kwargs)(images, labels, torch.Generator(), partner=call.get("partner"))


def _unit_etf(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A simplex ETF of unit rows in R^d built from scratch: centred standard basis, scaled, rotated."""
    basis, _ = torch.linalg.qr(torch.randn(dim, num_classes, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(seed)))
    centred = torch.eye(num_classes, dtype=torch.float64) - 1 / num_classes
    return math.sqrt(num_classes / (num_classes - 1)) * centred @ basis.T


def test_ufm_optimum_equals_a_direct_optimisation_of_the_feature():
    """The fixed point z = c (y - softmax(z)) against LBFGS on min_h lam CE(Wh, i) + (1 - lam) CE(Wh, j) +
    gamma/2 |h|^2 (K = 10, d = 16, gamma = 5e-3), and against the numbers of the shared notes' own solve."""
    K, gamma = 10, 5e-3
    W = _unit_etf(K, 16)
    lams = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64)
    z = optimal_mixup_logits(K / ((K - 1) * gamma), lams, 0, 1, K)
    for lam, z_star in zip(lams, z):
        h = torch.zeros(16, dtype=torch.float64, requires_grad=True)
        solver = torch.optim.LBFGS([h], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                   line_search_fn="strong_wolfe")

        def closure():
            solver.zero_grad()
            logits = W @ h
            loss = (torch.logsumexp(logits, 0) - lam * logits[0] - (1 - lam) * logits[1]
                    + gamma / 2 * h @ h)
            loss.backward()
            return loss

        solver.step(closure)
        assert (W @ h).detach().tolist() == pytest.approx(z_star.tolist(), abs=1e-5)
    p = z.softmax(-1)
    # h = W^T (y - p) / gamma = a w_0 + b w_1; the notes: (2.83, 4.89), (3.80, 4.58), (4.26, 4.26)
    a = (lams - p[:, 0] + p[:, 2]) / gamma
    b = (1 - lams - p[:, 1] + p[:, 2]) / gamma
    assert a.tolist() == pytest.approx([2.83, 3.80, 4.26], abs=0.01)
    assert b.tolist() == pytest.approx([4.89, 4.58, 4.26], abs=0.01)
    assert float(z[2, 0] - z[2, 1]) == pytest.approx(0, abs=1e-10)  # on the decision boundary at 1/2
    same = optimal_mixup_logits(K / ((K - 1) * gamma), lams, 3, 3, K)
    assert torch.allclose(same, same[:1].expand_as(same), atol=1e-12)  # independent of lambda
    margin = float(same[0, 3] - same[0, 0])
    assert scale_from_margin(margin, K) == pytest.approx(K / ((K - 1) * gamma), rel=1e-9)


def test_projection_maps_three_class_weights_to_an_equilateral_triangle():
    """Fig. 1's map on a hand-made head: any three rows become an equilateral triangle with its centre at 0, the
    plane's own coordinates are kept, and a direction orthogonal to the plane vanishes."""
    rows = torch.tensor([[3.0, 0, 0, 1], [0, 3.0, 0, 1], [0, 0, 3.0, 1]], dtype=torch.float64)
    P, mu_g = plane_projection(rows)
    assert mu_g.tolist() == pytest.approx([1, 1, 1, 1])
    vertices = (rows - mu_g) @ P.T
    sides = [float((vertices[a] - vertices[b]).norm()) for a, b in ((0, 1), (1, 2), (0, 2))]
    assert sides == pytest.approx([sides[0]] * 3) and vertices.sum(0).tolist() == pytest.approx([0, 0], abs=1e-12)
    # the centred rows have length sqrt(6); the map keeps lengths within the plane
    assert vertices.norm(dim=1).tolist() == pytest.approx([math.sqrt(6)] * 3)
    assert (torch.tensor([1.0, 1, 1, -3], dtype=torch.float64) @ P.T).abs().max() < 1e-12
    with pytest.raises(ValueError, match=r"three classes, \(3, d\)"):
        plane_projection(rows[:2])


def test_readout_drops_what_no_softmax_sees():
    """A head of rows e_1 + v, e_2 + v, e_3 + v (v shared): the centred rows, and a projector onto their plane, the
    features orthogonal to it (v's direction, the all-ones direction of the e's) leaving every softmax unchanged."""
    v = torch.tensor([0.0, 0, 0, 2], dtype=torch.float64)
    head = torch.eye(3, 4, dtype=torch.float64) + v
    centred, projector = readout(head)
    expected_rows = torch.eye(3, 4, dtype=torch.float64)
    expected_rows[:, :3] -= 1 / 3
    assert torch.allclose(centred, expected_rows, atol=1e-12)
    h = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    expected = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    expected[:3] -= expected[:3].mean()
    assert (h @ projector).tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    assert torch.allclose((head @ (h @ projector)).softmax(0), (head @ h).softmax(0), atol=1e-12)


@pytest.fixture(scope="module")
def fixed_etf():
    from hfpapers.methods.nc_mixup.experiments import fixed_etf_mixup

    config = NcMixupConfig(num_epochs=10, hidden_size=64, pairs_per_lambda=60, num_pairs=40,
                           lambda_grid=(0.1, 0.3, 0.5, 0.7, 0.9))
    return fixed_etf_mixup(config)


def test_fixed_etf_same_class_mixes_align_with_their_class_weight_whatever_lambda(fixed_etf):
    same = fixed_etf["same"]
    assert min(r["mean_cosine"] for r in same) > 0.75  # a class's own weight (another class's is at -1/9)
    assert fixed_etf["same_mean_cosine_spread"] < 0.05 and fixed_etf["same_norm_spread"] < 0.1


def test_fixed_etf_different_class_mixes_cross_the_boundary_at_one_half(fixed_etf):
    gaps = {r["lambda"]: r["gap"] for r in fixed_etf["different"]}
    assert gaps[0.1] < -1 and gaps[0.9] > 1
    assert abs(gaps[0.5]) < 0.1 * abs(gaps[0.1])
    assert fixed_etf["different_crossing_lambda"] == pytest.approx(0.5, abs=0.03)
    # the UFM optimum's gaps have the measured sign at every lambda
    assert all(np.sign(r["gap"]) == np.sign(r["predicted_gap"]) for r in fixed_etf["different"] if r["lambda"] != 0.5)


def test_runner_end_to_end(tmp_path):
    """`hfpapers run nc-mixup` on a freshly built tiny Scaling MLP: results.json, the three PNGs, the README."""
    import hfpapers
    from hfpapers.runs import run

    folder = tmp_path / "model"
    model = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=4)
    model.save_pretrained(folder)
    hfpapers.get_method("scaling-mlp").resolve("tiny").processor_factory(model.config).save_pretrained(folder)
    settings = {"num_examples": 64, "num_pairs": 30, "hidden_size": 16, "num_hidden_layers": 1, "num_epochs": 1,
                "pairs_per_lambda": 20, "lambda_grid": (0.25, 0.5, 0.75)}
    result = run("nc-mixup", str(folder), str(tmp_path / "out"), dataset="shapes",
                 dataset_kwargs={"resolution": 16, "num_train": 64, "num_test": 16, "num_classes": 4},
                 settings=settings)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(result.metrics)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "classifier_projection.png", "fixed_etf_lambda.png", "fixed_etf_projection.png"]
    classifier = saved["details"]["classifier"]
    assert len(classifier["projection"]["same"]["points"]) == 30 and len(classifier["classes"]) == 3
    assert "predicted" in (tmp_path / "out" / "README.md").read_text()
