"""Over-parameterised linear least squares (d > n): minimum-norm limit and Theorem 1.

Model (our reading of science.md; the constants are ours and derived here, see README):
L(b) = ||X b - y||^2 / (2 n) with y = X b_true, so every interpolator has zero loss. The SGD SDE
theta_t and the Noisy-SGD SDE beta_t start at 0 and share the Brownian motion W (R^n):

    d theta = -grad L(theta) dt + sqrt(gamma) Xbar^T diag(r(theta)) dW
    d beta  = -grad L(beta)  dt + sqrt(gamma) Xbar^T diag(r(beta))  dW
              + sqrt(gamma L(beta)) sigma dW~

with r(b) = X b - y (so Xbar^T diag(r)^2 Xbar = (1/n) sum_i r_i^2 x_i x_i^T is the single-sample
gradient covariance without its rank-one mean term) and W~ in R^d. SGD noise lives in the row
space of X and vanishes at interpolation, so theta_t -> the minimum-norm interpolator X^+ y;
the isotropic term moves beta in the null space.

Theorem 1 (this form): if gamma max_i ||x_i||^2 <= 2, E||theta_t - beta_t||^2 <= gamma d sigma^2
E int_0^t L(beta_s) ds. Proof: Ito on e = theta - beta gives d E||e||^2 = E[-2 e^T H e +
gamma (1/n) sum_i (x_i^T e)^2 ||x_i||^2 + gamma sigma^2 d L(beta)] dt, and the middle term is at
most gamma max||x_i||^2 e^T H e. The same holds step by step for Euler-Maruyama with step h when
h ||H|| + gamma max ||x_i||^2 <= 2, with the integral replaced by h sum_k L(beta_k): the
simulation checks the discrete inequality, which is exact, not asymptotic. The null-space part
alone gives E||P_perp beta_t||^2 = gamma (d - n) sigma^2 E int L(beta): a lower bound on the
left-hand side, so the ratio measured / bound must lie in [(d - n)/d, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OverparamResult:
    """Per-chain outcomes of :func:`simulate_theorem1` (arrays of shape (chains,))."""

    gap: np.ndarray  # ||theta_T - beta_T||^2
    bound: np.ndarray  # gamma d sigma^2 h sum_k L(beta_k)
    nullspace: np.ndarray  # ||P_perp beta_T||^2
    nullspace_pred: np.ndarray  # gamma (d - n) sigma^2 h sum_k L(beta_k)
    sgd_to_min_norm: np.ndarray  # ||theta_T - X^+ y||^2
    final_loss_noisy: np.ndarray  # L(beta_T)
    gap_path: np.ndarray  # (steps + 1, chains) ||theta_k - beta_k||^2
    bound_path: np.ndarray  # (steps + 1, chains) gamma d sigma^2 h sum_{j<k} L(beta_j)

    def max_excess(self) -> tuple[float, float, float]:
        """Over time: the largest ratio E gap / E bound, its stderr, and the largest z-score.

        The bound is tight as t -> 0 (the first step has E gap = bound exactly), so a fair check
        compares gap - bound with its standard error over chains rather than asking for a ratio
        strictly below 1.
        """
        gap, bound = self.gap_path[1:], self.bound_path[1:]
        diff = gap - bound
        se = diff.std(axis=1, ddof=1) / np.sqrt(diff.shape[1])
        ratio = gap.mean(axis=1) / bound.mean(axis=1)
        k = int(np.argmax(ratio))
        z = diff.mean(axis=1) / np.maximum(se, 1e-300)
        return float(ratio[k]), float(se[k] / bound[k].mean()), float(z.max())


def make_overparam_problem(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian X (n x d, d > n) and interpolable labels y = X b_true, b_true ~ N(0, I/d)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    return X, X @ (rng.standard_normal(d) / np.sqrt(d))


def min_norm_interpolator(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """X^+ y: the limit of GD and SGD started at 0 (iterates stay in the row space of X)."""
    return np.linalg.pinv(X) @ y


def theorem1_gamma(X: np.ndarray) -> float:
    """The largest gamma allowed by the theorem's condition gamma max_i ||x_i||^2 <= 2, halved."""
    return 1.0 / float(np.max(np.sum(X**2, axis=1)))


def simulate_theorem1(
    X: np.ndarray,
    y: np.ndarray,
    gamma: float,
    sigma: float,
    dt: float,
    steps: int,
    chains: int,
    seed: int,
) -> OverparamResult:
    """Euler-Maruyama for the coupled pair (theta, beta), ``chains`` independent copies."""
    n, d = X.shape
    H = X.T @ X / n
    if dt * np.linalg.norm(H, 2) + gamma * np.max(np.sum(X**2, axis=1)) > 2.0:
        raise ValueError("step condition h ||H|| + gamma max ||x_i||^2 <= 2 violated")
    rng = np.random.default_rng(seed)
    scale = np.sqrt(dt * gamma / n)
    theta = np.zeros((chains, d))
    beta = np.zeros((chains, d))
    integral = np.zeros(chains)
    gap_path = np.zeros((steps + 1, chains))
    bound_path = np.zeros((steps + 1, chains))
    for k in range(steps):
        r_theta = theta @ X.T - y  # (chains, n)
        r_beta = beta @ X.T - y
        L_beta = np.sum(r_beta**2, axis=1) / (2.0 * n)
        integral += dt * L_beta
        dW = rng.standard_normal((chains, n))
        dW_iso = rng.standard_normal((chains, d))
        theta = theta - dt * r_theta @ X / n + scale * (r_theta * dW) @ X
        beta = (
            beta
            - dt * r_beta @ X / n
            + scale * (r_beta * dW) @ X
            + np.sqrt(dt * gamma * L_beta)[:, None] * sigma * dW_iso
        )
        gap_path[k + 1] = np.sum((theta - beta) ** 2, axis=1)
        bound_path[k + 1] = gamma * d * sigma**2 * integral
    Q, _ = np.linalg.qr(X.T)  # orthonormal basis of the row space
    beta_null = beta - (beta @ Q) @ Q.T
    r_beta = beta @ X.T - y
    return OverparamResult(
        gap=np.sum((theta - beta) ** 2, axis=1),
        bound=gamma * d * sigma**2 * integral,
        nullspace=np.sum(beta_null**2, axis=1),
        nullspace_pred=gamma * (d - n) * sigma**2 * integral,
        sgd_to_min_norm=np.sum((theta - min_norm_interpolator(X, y)) ** 2, axis=1),
        final_loss_noisy=np.sum(r_beta**2, axis=1) / (2.0 * n),
        gap_path=gap_path,
        bound_path=bound_path,
    )
