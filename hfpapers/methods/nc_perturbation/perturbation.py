"""The perturbation model of neural collapse (Tirer, Huang, Niles-Weed, arXiv 2210.16658), in float64.

Layout as in the paper: features H (d, N) with one column per sample, classifier W (K, d), one-hot targets
Y (K, N); `labels` (N,) give each column's class and n = N / K (the samples per class of the balanced setting).

    f(W, H; H0) = 1/(2N) ||WH - Y||^2 + lambda_W/(2K) ||W||^2 + lambda_H/(2N) ||H||^2 + beta/(2N) ||H - H0||^2   (Eq. 2)

Minimising over W first leaves L(H) + beta/(2N) ||H - H0||^2, with L the UFM objective (Eq. 1) at
W*(H) = Y H^T (H H^T + n lambda_W I)^-1: the minimiser H_{1/beta} is an implicit gradient step of size 1/beta from
H0 along the central path dH/dt = -N grad L(H) (Eq. 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["targets", "optimal_classifier", "perturbation_objective", "central_path_loss", "central_path_velocity",
           "solve_perturbation_model", "PerturbationSolution", "central_path_flow", "collapsed_minimizer",
           "first_order_map", "class_blocks", "block_singular_values", "theorem_4_2"]


def _check(H: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if H.dim() != 2:
        raise ValueError(f"H must be a (d, N) matrix of features, one column per sample; got shape {tuple(H.shape)}")
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32) or labels.numel() != H.shape[1]:
        raise ValueError(f"labels must be N={H.shape[1]} integer class ids (one per column of H); got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"every class needs samples; classes {torch.nonzero(counts == 0).flatten().tolist()} have "
                         "none")


def targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Y (K, N): one-hot columns (Y = I_K kron 1_n^T when the columns are sorted by class)."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).T.to(torch.float64)


def optimal_classifier(H: torch.Tensor, Y: torch.Tensor, lambda_W: float) -> torch.Tensor:
    """W*(H) = Y H^T (H H^T + n lambda_W I_d)^-1, the exact minimiser of Eq. 1/2 over W (paper §3)."""
    K, N = Y.shape
    gram = H @ H.T + (N / K) * lambda_W * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.solve(gram, H @ Y.T).T  # the Gram matrix is symmetric: solve for W^T


def perturbation_objective(W, H, H0, Y, lambda_W: float, lambda_H: float, beta: float) -> torch.Tensor:
    """f(W, H; H0) of Eq. 2 (beta = 0 gives the UFM objective of Eq. 1)."""
    K, N = Y.shape
    return ((W @ H - Y).square().sum() / (2 * N) + lambda_W / (2 * K) * W.square().sum()
            + lambda_H / (2 * N) * H.square().sum() + beta / (2 * N) * (H - H0).square().sum())


def central_path_loss(H, Y, lambda_W: float, lambda_H: float) -> torch.Tensor:
    """L(H): Eq. 1 at W = W*(H)."""
    return perturbation_objective(optimal_classifier(H, Y, lambda_W), H, H, Y, lambda_W, lambda_H, 0.0)


def central_path_velocity(H, Y, lambda_W: float, lambda_H: float) -> torch.Tensor:
    """-N grad L(H) = -(W*^T (W* H - Y) + lambda_H H): W* is a minimiser, so only the explicit H-derivative
    remains (Eq. 4's right-hand side)."""
    W = optimal_classifier(H, Y, lambda_W)
    return -(W.T @ (W @ H - Y) + lambda_H * H)


@dataclass
class PerturbationSolution:
    W: torch.Tensor  # (K, d) = W*(H)
    H: torch.Tensor  # (d, N)
    iterations: int
    stationarity: float  # ||N grad_H f|| / ||H0||: 0 at a stationary point of Eq. 2


def solve_perturbation_model(H0: torch.Tensor, labels: torch.Tensor, num_classes: int, lambda_W: float,
                             lambda_H: float, beta: float, tolerance: float = 1e-10,
                             max_iterations: int = 10000) -> PerturbationSolution:
    """Minimise Eq. 2 by exact alternating steps from H = H0: W <- W*(H), then H <- argmin_H f(W, H; H0) =
    (W^T W + (lambda_H + beta) I)^-1 (W^T Y + beta H0). Each step lowers f; it stops once the stationarity residual
    of H (the W-gradient is zero after every W-step) falls below `tolerance`."""
    _check(H0, labels, num_classes)
    if not beta > 0 or lambda_W <= 0 or lambda_H < 0:
        raise ValueError(f"the perturbation model needs beta > 0, lambda_W > 0 and lambda_H >= 0; got beta={beta}, "
                         f"lambda_W={lambda_W}, lambda_H={lambda_H}")
    H0 = H0.to(torch.float64)
    Y = targets(labels, num_classes)
    eye = torch.eye(H0.shape[0], dtype=torch.float64)
    scale = H0.norm().clamp_min(1e-300)
    H = H0.clone()
    W = optimal_classifier(H, Y, lambda_W)
    for iteration in range(1, max_iterations + 1):
        H = torch.linalg.solve(W.T @ W + (lambda_H + beta) * eye, W.T @ Y + beta * H0)
        W = optimal_classifier(H, Y, lambda_W)
        # N grad_H f at (W*(H), H): -(velocity of Eq. 4) + beta (H - H0)
        residual = float((W.T @ (W @ H - Y) + lambda_H * H + beta * (H - H0)).norm() / scale)
        if residual < tolerance:
            break
    return PerturbationSolution(W, H, iteration, residual)


def central_path_flow(H0: torch.Tensor, labels: torch.Tensor, num_classes: int, lambda_W: float, lambda_H: float,
                      times, max_step: float = 0.05) -> list[torch.Tensor]:
    """H_t of the gradient flow dH/dt = -N grad L(H) (Eq. 4) at each of `times` (increasing, from 0), integrated
    with classical Runge-Kutta steps of at most `max_step`."""
    _check(H0, labels, num_classes)
    Y = targets(labels, num_classes)
    velocity = lambda H: central_path_velocity(H, Y, lambda_W, lambda_H)  # noqa: E731
    H, t, out = H0.to(torch.float64).clone(), 0.0, []
    for target in times:
        if target < t:
            raise ValueError(f"times must increase from 0; got {list(times)}")
        steps = math.ceil((target - t) / max_step)
        for _ in range(steps):
            dt = (target - t) / steps if steps else 0.0
            k1 = velocity(H)
            k2 = velocity(H + dt / 2 * k1)
            k3 = velocity(H + dt / 2 * k2)
            k4 = velocity(H + dt * k3)
            H = H + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t = float(target)
        out.append(H.clone())
    return out


def collapsed_minimizer(num_classes: int, feature_dim: int, samples_per_class: int, lambda_W: float,
                        lambda_H: float, generator: torch.Generator | None = None):
    """(W, H, labels) of Thm 2.1: h_{k,i} = h_k with H_bar^T H_bar = rho I_K, rho = (1 - sqrt(lambda_H lambda_W))
    sqrt(lambda_W / lambda_H), w_k = sqrt(lambda_H / lambda_W) h_k, on a random orthonormal frame; columns sorted
    by class."""
    c = math.sqrt(lambda_H * lambda_W)
    if lambda_W <= 0 or lambda_H <= 0 or c >= 1:
        raise ValueError(f"the collapsed minimiser exists for lambda_W, lambda_H > 0 with lambda_H * lambda_W < 1; "
                         f"got lambda_W={lambda_W}, lambda_H={lambda_H} (above, the minimiser is W = H = 0)")
    if feature_dim < num_classes:
        raise ValueError(f"an orthogonal frame of K={num_classes} class means needs feature_dim >= K; got "
                         f"feature_dim={feature_dim}")
    rho = (1 - c) * math.sqrt(lambda_W / lambda_H)
    frame, _ = torch.linalg.qr(torch.randn(feature_dim, num_classes, dtype=torch.float64, generator=generator))
    H_bar = math.sqrt(rho) * frame
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    return math.sqrt(lambda_H / lambda_W) * H_bar.T, H_bar[:, labels], labels


def first_order_map(W: torch.Tensor, H: torch.Tensor, labels: torch.Tensor, num_classes: int, lambda_W: float,
                    lambda_H: float, beta: float) -> torch.Tensor:
    """F (dN, dN) with vec(dH*) = F vec(dH0) at a minimiser (W, H) of Eq. 2 (Thm 4.1); vec stacks the columns of H.

    Differentiating grad f = 0 in H0 (implicit function theorem) with the Hessian of N f split into blocks
    [[A, C], [C^T, B]] over (vec W, vec H) gives (B - C^T A^-1 C) dH = beta dH0: F = beta (B - C^T A^-1 C)^-1."""
    _check(H, labels, num_classes)
    Y = targets(labels, num_classes)
    num_w = W.numel()
    N = H.shape[1]

    def scaled_objective(flat):
        W_, H_ = flat[:num_w].reshape(W.shape), flat[num_w:].reshape(N, -1).T
        return N * perturbation_objective(W_, H_, H_, Y, lambda_W, lambda_H, 0.0) \
            + beta / 2 * H_.square().sum()  # the beta term's Hessian; H0 does not enter it

    flat = torch.cat([W.reshape(-1), H.T.reshape(-1)]).to(torch.float64)
    hessian = torch.func.hessian(scaled_objective)(flat)
    A, C, B = hessian[:num_w, :num_w], hessian[:num_w, num_w:], hessian[num_w:, num_w:]
    schur = B - C.T @ torch.linalg.solve(A, C)
    return beta * torch.linalg.inv(schur)


def class_blocks(labels: torch.Tensor, feature_dim: int) -> list[torch.Tensor]:
    """For each class, the indices of vec(H) (columns stacked) that belong to its samples."""
    rows = torch.arange(labels.numel() * feature_dim).reshape(-1, feature_dim)
    return [rows[labels == k].reshape(-1) for k in range(int(labels.max()) + 1)]


def block_singular_values(F: torch.Tensor, labels: torch.Tensor, feature_dim: int) -> dict[str, float]:
    """The extreme singular values of F's intra-class blocks F_{k,k} and inter-class blocks F_{k,k'} (Thm 4.2),
    with the second singular value of the inter-class blocks (zero for a rank-1 block)."""
    blocks = class_blocks(labels, feature_dim)
    intra = [torch.linalg.svdvals(F[b][:, b]) for b in blocks]
    inter = [torch.linalg.svdvals(F[a][:, b]) for i, a in enumerate(blocks) for j, b in enumerate(blocks) if i != j]
    return {"intra_max": max(float(s[0]) for s in intra), "intra_min": min(float(s[-1]) for s in intra),
            "inter_max": max(float(s[0]) for s in inter), "inter_second": max(float(s[1]) for s in inter)}


def theorem_4_2(lambda_W: float, lambda_H: float, beta: float) -> dict[str, float]:
    """Thm 4.2's singular values of F at a collapsed H0 (d > K, lambda_H lambda_W < 1, beta >> max(1, lambda_H)),
    to first order in 1/beta."""
    return {"intra_max": 1.0, "intra_min": 1 - math.sqrt(lambda_H / lambda_W) / beta,
            "inter_max": 2 * lambda_H * (1 - math.sqrt(lambda_H * lambda_W)) / beta, "inter_second": 0.0}
