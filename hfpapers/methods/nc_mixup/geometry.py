"""The geometry of mixup features (paper §2-3): the three-class projection of Fig. 1 and the optimum of the
unconstrained features model (UFM) under the mixup loss with a simplex-ETF classifier.

UFM optimum. With W (K, d) a simplex ETF of unit rows (<w_i, w_j> = -1/(K-1)) and one free feature h per mixed
sample, min_h lam * CE(Wh, i) + (1 - lam) * CE(Wh, j) + (gamma / 2) |h|^2 has the stationarity condition
W^T (p - y) + gamma h = 0, y = lam e_i + (1 - lam) e_j, p = softmax(Wh). So h = W^T (y - p) / gamma, and since
W W^T = K / (K - 1) (I - 11^T / K) and 1^T (y - p) = 0, the logits z = Wh solve the fixed point

    z = c (y - softmax(z)),   c = K / ((K - 1) gamma),

the stationary point of the strictly convex |z|^2 / (2c) + logsumexp(z) - y.z: one solution. By symmetry the
other K - 2 logits are equal, so h = W^T (y - p) / gamma lies in span{w_i, w_j}. Same class (i = j): y = e_i
whatever lam, so h does not depend on lam, and h = (1 - p_i + p_o) w_i / gamma is aligned with w_i. Different
classes at lam = 1/2: z_i = z_j, the feature lies on the i/j decision boundary.
"""

from __future__ import annotations

import math

import torch

__all__ = ["plane_projection", "readout", "optimal_mixup_logits", "scale_from_margin", "fixed_etf_head"]

# Fig. 1's map of the three centred class directions onto an equilateral triangle: A = sqrt(2) [[1/2, -1/2, 0],
# [0, 0, sqrt(3/4)]] (I - 11^T / 3).
_TRIANGLE = math.sqrt(2) * torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, math.sqrt(0.75)]], dtype=torch.float64) @ (
    torch.eye(3, dtype=torch.float64) - 1 / 3)


def plane_projection(class_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's projection onto the plane of three class weights (Fig. 1): (P, mu_g) with P (2, d) and mu_g (d,)
    the mean of the three rows, so that a feature h maps to P (h - mu_g).

    class_weights: (3, d). P = A Q with Q = U V^T the polar factor of the centred rows W - mu_g (its SVD U S V^T);
    the centred rows themselves map to an equilateral triangle."""
    if class_weights.ndim != 2 or len(class_weights) != 3:
        raise ValueError(f"the projection needs the weights of three classes, (3, d); got {tuple(class_weights.shape)}")
    weights = class_weights.double()
    mu_g = weights.mean(0)
    u, _, vh = torch.linalg.svd(weights - mu_g, full_matrices=False)
    return _TRIANGLE @ (u @ vh), mu_g


def readout(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centred rows, projector): what a linear classifier (K, d) reads of a feature. Adding one vector to every
    row changes no softmax, so the rows are taken centred, w_k - mean_k w_k; the projector (d, d) maps a feature onto
    their span, the only part of it that moves the softmax (for a simplex ETF, the row space itself)."""
    centred = weight.double() - weight.double().mean(0)
    return centred, torch.linalg.pinv(centred) @ centred


def optimal_mixup_logits(scale: float, lam: torch.Tensor, i: int, j: int, num_classes: int,
                         iterations: int = 100) -> torch.Tensor:
    """The UFM optimum's logits (n, K) for mixes lam * class i + (1 - lam) * class j (lam: (n,)): the solution of
    z = scale * (y - softmax(z)), by damped Newton steps on the convex function whose gradient that is."""
    if not scale > 0:
        raise ValueError(f"scale must be above 0, got {scale}")
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
    y = torch.zeros(len(lam), num_classes, dtype=torch.float64)
    y[:, i] += lam
    y[:, j] += 1 - lam
    z = torch.zeros_like(y)
    eye = torch.eye(num_classes, dtype=torch.float64)

    def objective(z):
        return (z * z).sum(-1) / (2 * scale) + torch.logsumexp(z, -1) - (y * z).sum(-1)

    for _ in range(iterations):
        p = z.softmax(-1)
        grad = z / scale + p - y
        if grad.abs().max() < 1e-13:
            break
        hessian = eye / scale + torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        step = torch.linalg.solve(hessian, grad[..., None])[..., 0]
        t = torch.ones(len(z), 1, dtype=torch.float64)
        for _ in range(30):  # backtracking keeps every step a descent step
            worse = objective(z - t * step) > objective(z)
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        z = z - t * step
    return z


def scale_from_margin(margin: float, num_classes: int) -> float:
    """The c of the fixed point z = c (y - softmax(z)) whose same-class optimum has logit margin z_i - z_k = margin:
    there p_i = e^m / (e^m + K - 1) and p_k = 1 / (e^m + K - 1), and m = c (1 - p_i + p_k)."""
    if not margin > 0:
        raise ValueError(f"the same-class logit margin must be above 0 to fit the UFM, got {margin}")
    denominator = math.exp(margin) + num_classes - 1
    return margin / (1 - math.exp(margin) / denominator + 1 / denominator)


def fixed_etf_head(num_classes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(K, d) rows of unit norm forming a simplex ETF, placed in R^d by a random orthonormal map (d >= K)."""
    from ...analysis.neural_collapse import simplex_etf

    if dim < num_classes:
        raise ValueError(f"a simplex ETF of {num_classes} classes placed in R^d needs d >= K, got d={dim}")
    basis, _ = torch.linalg.qr(torch.randn(dim, num_classes, dtype=torch.float64, generator=generator))
    etf = simplex_etf(num_classes).double()
    return (etf / etf.norm(dim=1, keepdim=True)) @ basis.T
