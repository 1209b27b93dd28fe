"""The `fastdp theory lls` experiment: predicted vs measured covariance terms and Theorem 1.

Produces one row per compared quantity (quantity, predicted, measured), plus the standard error
of each measured value (kept apart from results.csv, whose columns are fixed) and the series
the figures are drawn from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from fastdp.theory import lls, lls_overparam


@dataclass(frozen=True)
class LLSConfig:
    """Sizes of the LLS experiment; ``quick`` and ``full`` presets live in fastdp.theory.cli."""

    n: int = 200
    d: int = 4
    eps: float = 1.0
    scales: tuple[float, ...] = (1.5, 1.0, 0.7, 0.5)
    gamma_hmax: float = 0.02  # gamma * lambda_max(H) for the discrete runs
    batches: tuple[int, ...] = (1, 4, 16)
    sigma_over_b: float = 2.0  # sigma / B, held fixed across batch sizes (TAN's rule)
    chains: int = 200
    steps: int = 20000
    burn_in: int = 2000
    sde_dt: float = 0.01
    over_n: int = 20
    over_d: int = 100
    over_sigmas: tuple[float, ...] = (0.5, 1.0, 2.0)
    over_chains: int = 200
    over_steps: int = 200
    seed: int = 0


@dataclass
class LLSReport:
    """Rows for results.csv, their standard errors, and the series behind the figures."""

    rows: list[dict] = field(default_factory=list)
    stderr: dict[str, float] = field(default_factory=dict)
    split: dict[int, dict[str, float]] = field(default_factory=dict)  # B -> coefficient table
    iso_samples: np.ndarray | None = None
    paths: dict[float, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)

    def add(self, quantity: str, predicted: float, measured: float, se: float = 0.0) -> None:
        """Append one comparison row; ``se`` is the standard error of ``measured``."""
        self.rows.append({"quantity": quantity, "predicted": predicted, "measured": measured})
        self.stderr[quantity] = se


def stages(cfg: LLSConfig, report: LLSReport) -> Iterator[tuple[str, Callable[[], None]]]:
    """The experiment as named stages, so the CLI can show one progress tick per stage."""
    problem = lls.make_problem(cfg.n, cfg.d, cfg.eps, np.array(cfg.scales), cfg.seed)
    H = problem.hessian
    d = cfg.d
    gamma = cfg.gamma_hmax / float(np.linalg.eigvalsh(H).max())
    relax = int(np.ceil(1.0 / (cfg.sde_dt * np.linalg.eigvalsh(H).min())))

    def isotropic_constant() -> None:
        # Pure isotropic noise d e = -H e dt + s dW, s = 1: S = c H^{-1}, c = 1/2 (paper: 1/4).
        samples = lls.isotropic_constant_estimate(
            lls.simulate_ou(H, np.eye(d), cfg.sde_dt, cfg.steps, 5 * relax, cfg.chains, cfg.seed),
            H,
            1.0,
        )
        mean, se = lls.mean_and_stderr(samples)
        # Euler-Maruyama's own stationary law with step h solves S = (I - hH) S (I - hH) + h I.
        h = cfg.sde_dt
        euler = scipy.linalg.solve_discrete_lyapunov(np.eye(d) - h * H, h * np.eye(d))
        report.iso_samples = samples
        report.add("under/ou_sde/isotropic_constant", lls.ISOTROPIC_CONSTANT, mean, se)
        report.add("under/ou_sde/isotropic_constant_paper", lls.PAPER_ISOTROPIC_CONSTANT, mean, se)
        euler_c = float(np.trace(euler @ H)) / d  # c of the simulated scheme: 1/2 + O(h)
        report.add("under/ou_sde/isotropic_constant_euler_exact", euler_c, mean, se)

    yield "OU SDE, isotropic constant", isotropic_constant

    def closed_form_vs_lyapunov(batch: int) -> Callable[[], None]:
        def run() -> None:
            sigma = cfg.sigma_over_b * batch
            Q = lls.ou_diffusion(problem, gamma, batch, sigma)
            lyap = lls.stationary_cov_lyapunov(H, Q)
            closed = lls.stationary_cov_closed_form(H, gamma, cfg.eps, batch, sigma)
            disc = lls.stationary_cov_discrete(problem, gamma, batch, sigma)
            report.add(f"under/B={batch}/lyapunov_trace", np.trace(closed), np.trace(lyap))
            sde = lls.simulate_ou(
                H, np.linalg.cholesky(Q), cfg.sde_dt, cfg.steps, 5 * relax, cfg.chains, cfg.seed
            )
            report.add(
                f"under/B={batch}/ou_sde/trace",
                float(np.trace(lyap)),
                *lls.mean_and_stderr(np.einsum("cii->c", sde)),
            )
            chains = lls.simulate_sgd(
                problem, gamma, batch, sigma, cfg.steps, cfg.burn_in, cfg.chains, cfg.seed + batch
            )
            a_meas, b_meas = lls.split_cov(chains, H)
            a_ou, b_ou = lls.split_cov(closed, H)
            a_dt, b_dt = lls.split_cov(disc, H)
            tr = np.einsum("cii->c", chains)
            for name, pred_ou, pred_dt, samples in (
                ("coef_identity", a_ou[0], a_dt[0], a_meas),
                ("coef_hinv", b_ou[0], b_dt[0], b_meas),
                ("trace", np.trace(closed), np.trace(disc), tr),
            ):
                mean, se = lls.mean_and_stderr(samples)
                report.add(f"under/B={batch}/sgd/{name}", float(pred_ou), mean, se)
                report.add(f"under/B={batch}/sgd/{name}_discrete_exact", float(pred_dt), mean, se)
            report.split[batch] = {
                "a_ou": float(a_ou[0]),
                "b_ou": float(b_ou[0]),
                "a_meas": float(a_meas.mean()),
                "b_meas": float(b_meas.mean()),
                "a_se": lls.mean_and_stderr(a_meas)[1],
                "b_se": lls.mean_and_stderr(b_meas)[1],
            }

        return run

    for batch in cfg.batches:
        yield f"discrete Noisy-SGD, B={batch}", closed_form_vs_lyapunov(batch)

    X, y = lls_overparam.make_overparam_problem(cfg.over_n, cfg.over_d, cfg.seed)
    over_gamma = lls_overparam.theorem1_gamma(X)
    dt = 0.9 / float(np.linalg.norm(X.T @ X / cfg.over_n, 2))

    def theorem1(sigma: float, seed: int) -> Callable[[], None]:
        def run() -> None:
            res = lls_overparam.simulate_theorem1(
                X, y, over_gamma, sigma, dt, cfg.over_steps, cfg.over_chains, seed
            )
            tag = f"over/sigma={sigma:g}"
            report.add(f"{tag}/theorem1_gap_vs_bound", *_mean_pair(res.bound, res.gap))
            ratio, ratio_se, z = res.max_excess()
            report.add(f"{tag}/theorem1_max_ratio_over_time", 1.0, ratio, ratio_se)
            report.add(f"{tag}/theorem1_max_zscore_of_excess", 0.0, z)
            final = res.gap.mean() / res.bound.mean()
            report.add(f"{tag}/theorem1_final_ratio", 1.0 - cfg.over_n / cfg.over_d, final)
            report.add(f"{tag}/nullspace_drift", *_mean_pair(res.nullspace_pred, res.nullspace))
            report.add(f"{tag}/sgd_to_min_norm", 0.0, *lls.mean_and_stderr(res.sgd_to_min_norm))
            report.paths[sigma] = (res.gap_path.mean(1), res.bound_path.mean(1), dt)

        return run

    for i, sigma in enumerate(cfg.over_sigmas):
        yield f"over-parameterised SDE, sigma={sigma:g}", theorem1(sigma, cfg.seed + 1 + i)


def _mean_pair(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float, float]:
    """Chain means of a per-chain prediction and measurement, with the measurement's stderr."""
    mean, se = lls.mean_and_stderr(measured)
    return float(np.mean(predicted)), mean, se
