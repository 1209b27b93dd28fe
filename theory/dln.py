"""Diagonal linear networks (DLN): the potential, the mirror map and the implicit-bias solver.

Model (Woodworth et al. 2020; Pesme et al. 2021; Sander et al. 2024, science.md):
``beta = w_plus**2 - w_minus**2`` elementwise, initialised at ``w_plus = w_minus = alpha``,
trained on ``L(beta) = ||X beta - y||^2 / (4 n)``. Gradient flow from that start converges to

    argmin_{X beta = y} phi_alpha(beta),
    phi_alpha(beta) = 1/4 sum_i [b_i arcsinh(b_i / (2 a_i^2)) - sqrt(b_i^2 + 4 a_i^4)]

(the hyperbolic-entropy potential). Stochastic versions converge to the same problem with a
smaller *effective* scale alpha_inf (formulas below), which is why their solutions are sparser.

This module holds the closed forms and the solver; ``fastdp.theory.dln_sim`` runs the discrete
algorithms (GD, SGD, Noisy-SGD) vectorised over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

ArrayLike = np.ndarray | float


# ---------------------------------------------------------------------------------------------
# Potential and mirror map
# ---------------------------------------------------------------------------------------------


def potential(beta: np.ndarray, alpha: ArrayLike) -> float:
    """The hyperbolic-entropy potential phi_alpha(beta) (a scalar), summed over coordinates."""
    a2 = np.asarray(alpha, dtype=float) ** 2
    return float(
        0.25 * np.sum(beta * np.arcsinh(beta / (2.0 * a2)) - np.sqrt(beta**2 + 4.0 * a2**2))
    )


def mirror_map(beta: np.ndarray, alpha: ArrayLike) -> np.ndarray:
    """grad phi_alpha(beta) = arcsinh(beta / (2 alpha^2)) / 4, coordinate-wise.

    Along gradient flow d/dt grad phi_alpha(beta_t) = -grad L(beta_t) lies in range(X^T); this
    is what makes the limit the mirror-descent solution.
    """
    a2 = np.asarray(alpha, dtype=float) ** 2
    return 0.25 * np.arcsinh(beta / (2.0 * a2))


def inverse_mirror_map(u: np.ndarray, alpha: ArrayLike) -> np.ndarray:
    """The inverse of :func:`mirror_map`: beta = 2 alpha^2 sinh(4 u)."""
    a2 = np.asarray(alpha, dtype=float) ** 2
    return 2.0 * a2 * np.sinh(4.0 * u)


def loss(beta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """L(beta) = ||X beta - y||^2 / (4 n); ``beta`` may carry leading batch axes."""
    n = X.shape[0]
    residual = beta @ X.T - y
    return np.sum(residual**2, axis=-1) / (4.0 * n)


def grad_w(
    w_plus: np.ndarray, w_minus: np.ndarray, X: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of L with respect to w_plus and w_minus (closed form, checked against autograd).

    grad_beta L = X^T (X beta - y) / (2 n) and d beta / d w_pm = +-2 w_pm, hence
    grad_{w_pm} L = +- X^T (X beta - y) / n * w_pm.
    """
    n = X.shape[0]
    beta = w_plus**2 - w_minus**2
    g = (beta @ X.T - y) @ X / n
    return g * w_plus, -g * w_minus


# ---------------------------------------------------------------------------------------------
# Effective scales
# ---------------------------------------------------------------------------------------------


def alpha_inf_sgd(
    alpha: ArrayLike, X: np.ndarray, gamma: float, integral_loss: float, batch: int = 1
) -> np.ndarray:
    """Pesme et al.'s effective scale for SGD with batch size ``batch``.

    alpha_inf = alpha * exp(-2 gamma diag(Xbar^T Xbar) int_0^inf L / batch), with Xbar = X/sqrt(n)
    and int L the continuous-time integral (time t = k gamma, so int L = gamma sum_k L_k).
    The 1/batch comes from the minibatch gradient variance; batch = 1 is science.md's formula.
    """
    n, d = X.shape
    diag = np.sum(X**2, axis=0) / n
    return np.broadcast_to(alpha, (d,)) * np.exp(-2.0 * gamma * diag * integral_loss / batch)


def alpha_inf_noisy_sgd(
    alpha: ArrayLike, X: np.ndarray, gamma: float, sigma: float, integral_loss: float
) -> np.ndarray:
    """science.md's Noisy-SGD effective scale: the SGD one times exp(-2 gamma sigma^2 int L).

    Derivation for the discrete model: each step multiplies w_plus * w_minus by
    (1 - gamma g + gamma s Z+)(1 + gamma g - gamma s Z-), g = r_i x_i, s = 2 sigma sqrt(L), whose
    log has mean -gamma^2 (g^2 + s^2) + O(gamma^3); averaging g^2 over i gives
    4 L diag(Xbar^T Xbar), so log alpha_t drops by 2 gamma (diag + sigma^2) gamma L_k per step.
    """
    base = alpha_inf_sgd(alpha, X, gamma, integral_loss)
    return base * np.exp(-2.0 * gamma * sigma**2 * integral_loss)


def geometric_mean(values: np.ndarray) -> float:
    """Geometric mean (the scalar summary of a per-coordinate scale written to results.csv)."""
    return float(np.exp(np.mean(np.log(values))))


# ---------------------------------------------------------------------------------------------
# The implicit-bias problem argmin_{X beta = y} phi_alpha(beta) - <shift, beta>
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorSolution:
    """Solution of the constrained mirror problem with its certificate of accuracy."""

    beta: np.ndarray
    dual: np.ndarray
    constraint_residual: float  # ||X beta - y||_inf
    iterations: int


def solve_mirror_problem(
    X: np.ndarray,
    y: np.ndarray,
    alpha: ArrayLike,
    shift: np.ndarray | None = None,
    tol: float = 1e-12,
    max_iter: int = 500,
) -> MirrorSolution:
    """argmin over {X beta = y} of phi_alpha(beta) - <shift, beta>, to high accuracy.

    Why the dual: the KKT conditions read grad phi_alpha(beta) = X^T lam + shift, i.e.
    beta(lam) = 2 alpha^2 sinh(4 (X^T lam + shift)), so the problem reduces to the smooth, convex,
    n-dimensional dual  min_lam D(lam) = sum_i alpha_i^2/2 cosh(4 u_i) - lam^T y,  u = X^T lam +
    shift, whose gradient is exactly the constraint residual X beta(lam) - y. Damped Newton with
    Armijo backtracking (Cholesky solves from scipy) drives that residual to ``tol`` relative to
    ||y||_inf; a nonzero ``shift`` gives the "shifted start" problems of Propositions 2-3.
    """
    n, d = X.shape
    # log(alpha^2): alpha_inf can be far below 1e-150, so alpha^2 cosh(4u) is formed as
    # (exp(log a2 + 4u) + exp(log a2 - 4u)) / 2, which stays finite where cosh alone overflows.
    log_a2 = np.broadcast_to(2.0 * np.log(np.asarray(alpha, dtype=float)), (d,))
    c = np.zeros(d) if shift is None else np.asarray(shift, dtype=float)
    scale = max(float(np.max(np.abs(y))), 1e-300)

    def parts(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = X.T @ lam + c
        with np.errstate(over="ignore"):  # an overflowing trial point is simply rejected
            return np.exp(log_a2 + 4.0 * u), np.exp(log_a2 - 4.0 * u)

    def dual_value(lam: np.ndarray) -> float:
        e_plus, e_minus = parts(lam)
        return float(np.sum(e_plus + e_minus) / 4.0 - lam @ y)

    lam = np.zeros(n)
    for iteration in range(1, max_iter + 1):
        e_plus, e_minus = parts(lam)
        u = X.T @ lam + c
        small = np.abs(u) < 5.0  # there e_plus - e_minus would cancel: use sinh directly
        beta = np.where(small, 2.0 * np.exp(log_a2) * np.sinh(4.0 * np.where(small, u, 0.0)), 0.0)
        beta = np.where(small, beta, e_plus - e_minus)  # = 2 alpha^2 sinh(4u)
        grad = X @ beta - y
        if np.max(np.abs(grad)) <= tol * scale:
            return MirrorSolution(beta, lam, float(np.max(np.abs(grad))), iteration)
        hess = (X * (4.0 * (e_plus + e_minus))) @ X.T  # X diag(8 alpha^2 cosh(4u)) X^T
        hess += 1e-14 * np.trace(hess) / n * np.eye(n)
        step = scipy.linalg.solve(hess, grad, assume_a="pos")
        value, slope, t = dual_value(lam), float(grad @ step), 1.0
        slack = 1e-13 * abs(value)  # D is only known to rounding error near the optimum
        while dual_value(lam - t * step) > value - 0.25 * t * slope + slack:
            t *= 0.5
            if t < 1e-14:
                raise RuntimeError("mirror solver: line search failed (ill-conditioned dual)")
        lam = lam - t * step
    raise RuntimeError(f"mirror solver did not reach tol={tol} in {max_iter} Newton steps")


def min_l2_interpolator(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||beta||_2 subject to X beta = y (the alpha -> infinity limit, kernel regime)."""
    return np.linalg.lstsq(X, y, rcond=None)[0]
