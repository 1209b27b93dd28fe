"""Discrete GD, SGD, minibatch SGD and Noisy-SGD on diagonal linear networks, vectorised.

The state has shape (seeds, sigmas, d): every seed is its own sparse-regression instance and
random stream, every sigma a copy of the network driven by the *same* sample indices and the
same Gaussian draws (common random numbers), so differences across sigma are paired.

Updates (science.md, the discrete model of Sander et al. 2024, with r_i = x_i^T beta - y_i):
    GD:          w_pm <- w_pm -+ gamma (X^T r / n) * w_pm
    SGD, batch b: w_pm <- w_pm -+ gamma (1/b) sum_{i in batch} r_i x_i * w_pm
    Noisy-SGD:   single-sample SGD, then w_pm <- ... +- gamma sigma_t Z_pm * w_pm,
                 Z_pm ~ N(0, I), sigma_t = 2 sigma sqrt(L(w))
Time is t = k gamma, so the logged integral of the loss is gamma * sum_k L(beta_k).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_DATA_STREAM = 0  # second word of the seed sequence that draws a problem instance
_ALGO_STREAM = 1  # ... and the one that draws sample indices and noise
_CHUNK = 512  # random numbers are drawn in chunks of this many steps (part of the stream)
DIVERGED_LOSS = 1e8  # a run whose loss passes this (or turns non-finite) is marked diverged


@dataclass(frozen=True)
class SparseProblems:
    """A stack of sparse-regression instances, one per seed: y = X beta_star exactly."""

    X: np.ndarray  # (seeds, n, d), x_i ~ N(0, I)
    y: np.ndarray  # (seeds, n)
    beta_star: np.ndarray  # (seeds, d), ``sparsity`` non-zeros
    gamma: np.ndarray  # (seeds,), gamma = 1 / (1.3 ||Xbar Xbar^T||_2)
    seeds: tuple[int, ...]


def make_sparse_problems(
    seeds: Sequence[int],
    n: int = 40,
    d: int = 100,
    sparsity: int = 5,
    magnitude: float = 1.0,
    step_scale: float = 1.0,
) -> SparseProblems:
    """The experiment of Pesme et al. / Sander et al.: n = 40, d = 100, a 5-sparse beta_star.

    The paper gives neither beta_star's values nor seeds. Our choice: the support is a uniformly
    random set of ``sparsity`` coordinates and the values are +-``magnitude`` with random signs,
    all drawn from ``numpy.random.default_rng([seed, 0])``; the step is Pesme et al.'s
    gamma = 1 / (1.3 ||Xbar Xbar^T||_2) computed per instance, times ``step_scale``.
    """
    Xs, ys, bs, gs = [], [], [], []
    for seed in seeds:
        rng = np.random.default_rng([seed, _DATA_STREAM])
        X = rng.standard_normal((n, d))
        beta_star = np.zeros(d)
        support = rng.choice(d, size=sparsity, replace=False)
        beta_star[support] = magnitude * rng.choice([-1.0, 1.0], size=sparsity)
        Xs.append(X)
        ys.append(X @ beta_star)
        bs.append(beta_star)
        gs.append(step_scale / (1.3 * np.linalg.norm(X @ X.T / n, 2)))
    return SparseProblems(np.stack(Xs), np.stack(ys), np.stack(bs), np.array(gs), tuple(seeds))


@dataclass
class DLNRun:
    """What one vectorised simulation returns; arrays are indexed (seed, sigma, ...)."""

    method: str
    sigmas: np.ndarray  # (K,)
    batch: int
    log_steps: np.ndarray  # (T,) step index of each logged point
    distance: np.ndarray  # (S, K, T) ||beta_t - beta_star||^2
    loss: np.ndarray  # (S, K, T)
    integral_loss: np.ndarray  # (S, K) gamma * sum_k L(beta_k)
    w_plus: np.ndarray  # (S, K, d) final weights
    w_minus: np.ndarray  # (S, K, d)
    diverged: np.ndarray  # (S, K) bool
    diverged_at: np.ndarray  # (S, K) first step flagged diverged, -1 if never

    @property
    def beta(self) -> np.ndarray:
        """Final beta = w_plus^2 - w_minus^2, shape (S, K, d)."""
        return self.w_plus**2 - self.w_minus**2


def simulate(
    problems: SparseProblems,
    method: str,
    alpha: float,
    steps: int,
    sigmas: Sequence[float] = (0.0,),
    batch: int = 1,
    log_every: int = 100,
    progress: Callable[[int], None] | None = None,
) -> DLNRun:
    """Run ``method`` in {"gd", "sgd", "noisy_sgd"} for ``steps`` steps from w_pm = alpha.

    "sgd" uses minibatches of ``batch`` indices drawn uniformly with replacement; "noisy_sgd" is
    the single-sample discrete model with one copy per value in ``sigmas`` (sigma = 0 is SGD with
    the identical index stream). ``progress(k)`` is called with the number of steps just done.
    """
    if method not in ("gd", "sgd", "noisy_sgd"):
        raise ValueError(f"unknown method {method!r}")
    X, y, beta_star = problems.X, problems.y, problems.beta_star
    S, n, d = X.shape
    sig = np.asarray(sigmas if method == "noisy_sgd" else (0.0,), dtype=float)
    K = sig.size
    b = 1 if method == "noisy_sgd" else batch
    gamma = problems.gamma[:, None]  # (S, 1)
    rngs = [np.random.default_rng([seed, _ALGO_STREAM]) for seed in problems.seeds]
    rows = np.arange(S)[:, None]

    wp = np.full((S, K, d), float(alpha))
    wm = np.full((S, K, d), float(alpha))
    integral = np.zeros((S, K))
    diverged = np.zeros((S, K), dtype=bool)
    diverged_at = np.full((S, K), -1)
    log_steps = np.arange(0, steps + 1, log_every)
    dist_log = np.full((S, K, log_steps.size), np.nan)
    loss_log = np.full((S, K, log_steps.size), np.nan)
    Xt = np.swapaxes(X, 1, 2)  # (S, d, n)

    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, steps, _CHUNK):
            chunk = min(_CHUNK, steps - start)
            if method != "gd":
                idx = np.stack([r.integers(n, size=(_CHUNK, b)) for r in rngs], axis=1)
            if method == "noisy_sgd":
                noise = np.stack([r.standard_normal((_CHUNK, 2, d)) for r in rngs], axis=1)
            for j in range(chunk):
                k = start + j
                beta = wp * wp - wm * wm
                residual = beta @ Xt - y[:, None, :]  # (S, K, n)
                L = np.sum(residual * residual, axis=-1) / (4.0 * n)
                if k % log_every == 0:
                    dist_log[:, :, k // log_every] = np.sum((beta - beta_star[:, None]) ** 2, -1)
                    loss_log[:, :, k // log_every] = L
                integral += gamma * L
                if method == "gd":
                    g = residual @ X / n  # (S, K, d)
                else:
                    ib = idx[j]  # (S, b)
                    xb = X[rows, ib]  # (S, b, d)
                    rb = np.take_along_axis(residual, np.broadcast_to(ib[:, None], (S, K, b)), -1)
                    g = np.einsum("skb,sbd->skd", rb, xb) / b
                step = gamma[..., None] * g
                if method == "noisy_sgd":
                    s_t = (2.0 * gamma * np.sqrt(L))[..., None] * sig[None, :, None]
                    zp, zm = noise[j][:, None, 0, :], noise[j][:, None, 1, :]
                    wp = wp * (1.0 - step + s_t * zp)
                    wm = wm * (1.0 + step - s_t * zm)
                else:
                    wp = wp * (1.0 - step)
                    wm = wm * (1.0 + step)
                bad = ~np.isfinite(L) | (L > DIVERGED_LOSS)
                if bad.any():
                    new = bad & ~diverged
                    diverged_at[new] = k
                    diverged |= bad
                    wp[diverged] = np.nan
                    wm[diverged] = np.nan
            if progress is not None:
                progress(chunk)
        beta = wp * wp - wm * wm
        residual = beta @ Xt - y[:, None, :]
        L = np.sum(residual * residual, axis=-1) / (4.0 * n)
        if steps % log_every == 0:
            dist_log[:, :, -1] = np.sum((beta - beta_star[:, None]) ** 2, -1)
            loss_log[:, :, -1] = L
    return DLNRun(
        method, sig, b, log_steps, dist_log, loss_log, integral, wp, wm, diverged, diverged_at
    )
