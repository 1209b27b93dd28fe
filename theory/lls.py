"""Under-parameterised linear least squares: the Ornstein-Uhlenbeck model of (Noisy-)SGD.

Loss L(theta) = ||X theta - y||^2 / (2 n) = 1/2 ||Xbar theta - Ybar||^2, Xbar = X / sqrt(n),
Hessian H = Xbar^T Xbar, minimiser theta_star. Discrete Noisy-SGD with i.i.d. minibatches of B
indices (drawn with replacement) and learning rate gamma:

    theta <- theta - gamma ( (1/B) sum_{i in batch} x_i (x_i^T theta - y_i) + (sigma / B) xi ),

whose per-step noise has covariance gamma^2 (Sigma(theta) / B + sigma^2 / B^2 I), Sigma the
per-sample gradient covariance. With t = k gamma this is the OU process

    d theta = -H (theta - theta_star) dt + sqrt(gamma) (Sigma_* / B + sigma^2 / B^2 I)^{1/2} dW,

Sigma_* = Sigma(theta_star): science.md's SDE with eps^2 = (residual variance) / B and the
diffusion coefficient **sqrt(gamma) sigma / B** multiplying dW~. The stationary covariance
solves the Lyapunov equation H S + S H = Q, Q = D D^T. When Sigma_* = eps^2 H exactly
(``make_problem`` builds such data) the solution is

    S = gamma eps^2 / (2 B) I + ISOTROPIC_CONSTANT * gamma sigma^2 / B^2 H^{-1},

with constant 1/2: the isotropic part of Q is s^2 I, s^2 = gamma sigma^2 / B^2, and c H^{-1}
solves H S + S H = s^2 I iff 2 c = s^2. theory/README.md says where the paper's 1/4 can come
from; tests/test_lls.py::test_isotropic_constant_is_one_half_not_one_quarter decides by
simulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

ISOTROPIC_CONSTANT = 0.5  # c in S_iso = c * (diffusion^2) * H^{-1}; derived in the module doc
PAPER_ISOTROPIC_CONSTANT = 0.25  # the value printed in the paper (science.md), which we refute


@dataclass(frozen=True)
class LLSProblem:
    """A least-squares instance whose per-sample gradient covariance at theta_star is eps^2 H."""

    X: np.ndarray  # (n, d)
    y: np.ndarray  # (n,)
    theta_star: np.ndarray  # (d,) the least-squares solution
    eps: float  # |residual_i| at theta_star, the same for every sample

    @property
    def hessian(self) -> np.ndarray:
        """H = Xbar^T Xbar = X^T X / n."""
        return self.X.T @ self.X / self.X.shape[0]


def make_problem(n: int, d: int, eps: float, scales: np.ndarray, seed: int) -> LLSProblem:
    """Gaussian design with column scales ``scales`` and residuals exactly +-eps at theta_star.

    Why: the OU closed form needs Sigma(theta_star) = eps^2 H. Taking residuals r = eps s with
    signs s and projecting every column of X off s (so X^T s = 0) makes theta_true the exact
    least-squares solution and Sigma(theta_star) = (1/n) sum_i eps^2 x_i x_i^T = eps^2 H.
    Anisotropic ``scales`` keep H^{-1} distinguishable from I.
    """
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=n)
    X = rng.standard_normal((n, d)) * np.asarray(scales, dtype=float)
    X -= np.outer(signs, signs @ X) / n
    theta = rng.standard_normal(d)
    return LLSProblem(X, X @ theta + eps * signs, theta, float(eps))


def gradient_noise_cov(problem: LLSProblem, theta: np.ndarray) -> np.ndarray:
    """Sigma(theta) = (1/n) sum_i g_i g_i^T - g_bar g_bar^T, g_i = x_i (x_i^T theta - y_i)."""
    g = problem.X * (problem.X @ theta - problem.y)[:, None]
    g_bar = g.mean(axis=0)
    return g.T @ g / g.shape[0] - np.outer(g_bar, g_bar)


def ou_diffusion(problem: LLSProblem, gamma: float, batch: int, sigma: float) -> np.ndarray:
    """Q = gamma (Sigma(theta_star) / B + sigma^2 / B^2 I), the OU diffusion matrix D D^T."""
    d = problem.X.shape[1]
    cov = gradient_noise_cov(problem, problem.theta_star)
    return gamma * (cov / batch + (sigma / batch) ** 2 * np.eye(d))


def stationary_cov_lyapunov(H: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Solve H S + S H = Q (stationary covariance of d e = -H e dt + D dW, Q = D D^T)."""
    return scipy.linalg.solve_continuous_lyapunov(H, Q)


def stationary_cov_closed_form(
    H: np.ndarray,
    gamma: float,
    eps: float,
    batch: int,
    sigma: float,
    iso_const: float = ISOTROPIC_CONSTANT,
) -> np.ndarray:
    """gamma eps^2/(2B) I + iso_const gamma sigma^2/B^2 H^{-1}; exact for iso_const = 1/2."""
    d = H.shape[0]
    sgd = gamma * eps**2 / (2.0 * batch) * np.eye(d)
    return sgd + iso_const * gamma * (sigma / batch) ** 2 * np.linalg.inv(H)


def stationary_cov_discrete(
    problem: LLSProblem, gamma: float, batch: int, sigma: float
) -> np.ndarray:
    """Exact stationary E[(theta - theta_star)(...)^T] of the *discrete* minibatch recursion.

    With e = theta - theta_star and residuals r_i at theta_star, independence of e_k from the
    k-th batch gives the linear fixed point
        M = (I - gH) M (I - gH) + g^2/B [ (1/n) sum_i x_i x_i^T (x_i^T M x_i) + Sigma_* - H M H ]
            + g^2 sigma^2 / B^2 I,
    solved as a d^2 x d^2 linear system. It differs from the OU answer by O(gamma): the oracle
    for the discrete simulations, while the OU formulas are the paper's model.
    """
    X = problem.X
    n, d = X.shape
    H = problem.hessian
    A = np.eye(d) - gamma * H
    eye = np.eye(d * d)
    op = np.kron(A, A) - gamma**2 / batch * np.kron(H, H)
    outer = np.einsum("ni,nj->nij", X, X).reshape(n, d * d)
    op += gamma**2 / batch * outer.T @ outer / n  # vec(x x^T) vec(x x^T)^T acts as x x^T M x x^T
    rhs = gamma**2 * (
        gradient_noise_cov(problem, problem.theta_star) / batch + (sigma / batch) ** 2 * np.eye(d)
    )
    M = np.linalg.solve(eye - op, rhs.reshape(-1)).reshape(d, d)
    return 0.5 * (M + M.T)


def split_cov(S: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (Frobenius) coefficients (a, b) of S ~ a I + b H^{-1}; S may be batched."""
    Hinv = np.linalg.inv(H)
    basis = np.stack([np.eye(H.shape[0]), Hinv]).reshape(2, -1)
    coef = np.linalg.lstsq(basis.T, S.reshape(-1, H.size).T, rcond=None)[0]
    return coef[0], coef[1]


# ---------------------------------------------------------------------------------------------
# Simulations, vectorised over independent chains (the seed axis)
# ---------------------------------------------------------------------------------------------


def simulate_ou(
    H: np.ndarray,
    diffusion: np.ndarray,
    dt: float,
    steps: int,
    burn_in: int,
    chains: int,
    seed: int,
    thin: int = 5,
) -> np.ndarray:
    """Euler-Maruyama for d e = -H e dt + D dW (e = theta - theta_star), ``chains`` in parallel.

    Chains start at e = 0, run ``burn_in`` steps, then time-average e e^T every ``thin`` steps.
    Returns the per-chain averages (chains, d, d): independent estimates of the stationary
    covariance whose spread gives an honest standard error.
    """
    rng = np.random.default_rng(seed)
    d, m = diffusion.shape
    step_noise = np.sqrt(dt) * diffusion.T  # rows: dW components
    drift = np.eye(d) - dt * H
    e = np.zeros((chains, d))
    acc = np.zeros((chains, d, d))
    count = 0
    for k in range(burn_in + steps):
        e = e @ drift.T + rng.standard_normal((chains, m)) @ step_noise
        if k >= burn_in and (k - burn_in) % thin == 0:
            acc += e[:, :, None] * e[:, None, :]
            count += 1
    return acc / count


def simulate_sgd(
    problem: LLSProblem,
    gamma: float,
    batch: int,
    sigma: float,
    steps: int,
    burn_in: int,
    chains: int,
    seed: int,
    thin: int = 5,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Discrete minibatch (Noisy-)SGD from theta_star; per-chain time-averaged e e^T (chains, d, d).

    Minibatches are ``batch`` i.i.d. uniform indices (with replacement, matching the noise
    covariance Sigma/B of the OU model); Gaussian noise sigma/B xi is added to the mean gradient.
    """
    rng = np.random.default_rng(seed)
    X, y = problem.X, problem.y
    n, d = X.shape
    theta = np.tile(problem.theta_star, (chains, 1))
    acc = np.zeros((chains, d, d))
    count = 0
    for k in range(burn_in + steps):
        idx = rng.integers(n, size=(chains, batch))
        xb = X[idx]  # (chains, B, d)
        residual = np.einsum("cbd,cd->cb", xb, theta) - y[idx]
        grad = np.einsum("cb,cbd->cd", residual, xb) / batch
        theta = theta - gamma * (grad + sigma / batch * rng.standard_normal((chains, d)))
        if k >= burn_in and (k - burn_in) % thin == 0:
            e = theta - problem.theta_star
            acc += e[:, :, None] * e[:, None, :]
            count += 1
        if progress is not None and (k + 1) % 1000 == 0:
            progress(1000)
    return acc / count


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean over chains and its standard error (chains are independent)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def isotropic_constant_estimate(S_chains: np.ndarray, H: np.ndarray, s2: float) -> np.ndarray:
    """Per-chain estimate of c in S = c s^2 H^{-1}: tr(S H) / (d s^2) (pure isotropic noise)."""
    return np.einsum("cij,ji->c", S_chains, H) / (H.shape[0] * s2)
