"""The `fastdp theory dln` experiment: GD vs SGD vs Noisy-SGD on sparse regression.

One results.csv row per (method, batch, sigma, seed) run, with the final distance to beta_star,
the effective scale alpha_inf from the logged integral of the loss, the measured effective
scale sqrt(|w_plus w_minus|), and the distances from the limit to the mirror-descent predictions
argmin_{X beta = y} phi_alpha (Propositions 2-3 of the paper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fastdp.theory import dln, dln_sim


@dataclass(frozen=True)
class DLNConfig:
    """Sizes of the DLN experiment; ``quick`` and ``full`` presets live in fastdp.theory.cli."""

    seeds: int = 8
    steps: int = 100_000
    alpha: float = 0.1
    sigmas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    minibatch: int = 8
    n: int = 40
    d: int = 100
    sparsity: int = 5
    magnitude: float = 1.0  # |beta_star_i| on the support
    step_scale: float = 1.0  # gamma = step_scale / (1.3 ||Xbar Xbar^T||_2)
    log_every: int = 100


@dataclass
class DLNReport:
    """results.csv rows and the simulations the figures are drawn from."""

    rows: list[dict]
    runs: dict[str, dln_sim.DLNRun]
    problems: dln_sim.SparseProblems


def total_steps(cfg: DLNConfig) -> int:
    """Steps simulated in all (for the progress bar): GD, minibatch SGD and the sigma sweep."""
    return 3 * cfg.steps


def run(cfg: DLNConfig, progress: Callable[[int], None] | None = None) -> DLNReport:
    """Simulate every method on ``cfg.seeds`` instances and compare limits with predictions."""
    problems = dln_sim.make_sparse_problems(
        range(cfg.seeds), cfg.n, cfg.d, cfg.sparsity, cfg.magnitude, cfg.step_scale
    )
    common = dict(alpha=cfg.alpha, steps=cfg.steps, log_every=cfg.log_every, progress=progress)
    runs = {
        "gd": dln_sim.simulate(problems, "gd", **common),
        f"sgd_b{cfg.minibatch}": dln_sim.simulate(problems, "sgd", batch=cfg.minibatch, **common),
        "noisy_sgd": dln_sim.simulate(problems, "noisy_sgd", sigmas=cfg.sigmas, **common),
    }
    rows = []
    for sim in runs.values():
        for s in range(cfg.seeds):
            for k, sigma in enumerate(sim.sigmas):
                rows.append(_row(cfg, problems, sim, s, k, float(sigma)))
    return DLNReport(rows, runs, problems)


def _row(
    cfg: DLNConfig, problems: dln_sim.SparseProblems, sim: dln_sim.DLNRun, s: int, k: int, sigma
) -> dict:
    """One results.csv row: what the run reached and what the theory predicts for it."""
    X, y, gamma = problems.X[s], problems.y[s], float(problems.gamma[s])
    integral = float(sim.integral_loss[s, k])
    if sim.method == "gd":
        method, a_inf = "gd", np.full(cfg.d, cfg.alpha)
    elif sim.method == "sgd" or sigma == 0.0:
        method = "sgd"
        a_inf = dln.alpha_inf_sgd(cfg.alpha, X, gamma, integral, batch=sim.batch)
    else:
        method = "noisy_sgd"
        a_inf = dln.alpha_inf_noisy_sgd(cfg.alpha, X, gamma, sigma, integral)
    row = {
        "method": method,
        "batch": cfg.n if sim.method == "gd" else sim.batch,
        "sigma": sigma,
        "seed": problems.seeds[s],
        "alpha": cfg.alpha,
        "steps": cfg.steps,
        "gamma": gamma,
        "diverged": bool(sim.diverged[s, k]),
        "diverged_at_step": int(sim.diverged_at[s, k]),
        "final_distance": np.nan,
        "final_loss": np.nan,
        "integral_loss": integral,
        "alpha_inf": np.nan,
        "alpha_eff": np.nan,
        "dist_to_mirror_alpha_inf": np.nan,
        "dist_to_mirror_alpha_eff": np.nan,
    }
    if sim.diverged[s, k]:
        return row
    beta = sim.beta[s, k]
    a_eff = np.sqrt(np.abs(sim.w_plus[s, k] * sim.w_minus[s, k]))
    row.update(
        final_distance=float(np.sum((beta - problems.beta_star[s]) ** 2)),
        final_loss=float(dln.loss(beta, X, y)),
        alpha_inf=dln.geometric_mean(a_inf),
        alpha_eff=dln.geometric_mean(a_eff),
        dist_to_mirror_alpha_inf=_mirror_distance(beta, X, y, a_inf),
        dist_to_mirror_alpha_eff=_mirror_distance(beta, X, y, a_eff),
    )
    return row


def _mirror_distance(beta: np.ndarray, X: np.ndarray, y: np.ndarray, alpha: np.ndarray) -> float:
    """||beta - argmin_{X b = y} phi_alpha(b)||^2, NaN where the solver cannot certify it."""
    try:
        return float(np.sum((beta - dln.solve_mirror_problem(X, y, alpha).beta) ** 2))
    except RuntimeError:
        return np.nan


def summarise(rows: list[dict]) -> list[dict]:
    """Per (method, batch, sigma): runs, divergences, mean / median final distance, alpha_inf."""
    keys = sorted({(r["method"], r["batch"], r["sigma"]) for r in rows}, key=_order)
    sgd = {r["seed"]: r for r in rows if r["method"] == "sgd" and r["batch"] == 1}
    out = []
    for method, batch, sigma in keys:
        group = [r for r in rows if (r["method"], r["batch"], r["sigma"]) == (method, batch, sigma)]
        ok = [r for r in group if not r["diverged"]]
        dist = np.array([r["final_distance"] for r in ok])
        out.append(
            {
                "method": method,
                "batch": batch,
                "sigma": sigma,
                "runs": len(group),
                "diverged": len(group) - len(ok),
                "mean_distance": float(dist.mean()) if ok else np.nan,
                "stderr_distance": float(dist.std(ddof=1) / np.sqrt(dist.size))
                if len(ok) > 1
                else np.nan,
                "median_distance": float(np.median(dist)) if ok else np.nan,
                "mean_alpha_inf": float(np.mean([r["alpha_inf"] for r in ok])) if ok else np.nan,
                "mean_dist_to_mirror_alpha_inf": float(
                    np.mean([r["dist_to_mirror_alpha_inf"] for r in ok])
                )
                if ok
                else np.nan,
            }
        )
        # Paired with single-sample SGD on the same seed (same data, same index stream).
        pairs = [
            (r, sgd[r["seed"]]) for r in ok if r["seed"] in sgd and not sgd[r["seed"]]["diverged"]
        ]
        ratios = np.array([r["final_distance"] / b["final_distance"] for r, b in pairs])
        out[-1]["closer_than_sgd"] = int(np.sum(ratios < 1.0)) if pairs else 0
        out[-1]["geomean_ratio_to_sgd"] = (
            float(np.exp(np.mean(np.log(ratios)))) if pairs else np.nan
        )
    return out


def _order(key: tuple[str, int, float]) -> tuple[int, int, float]:
    method, batch, sigma = key
    return ({"gd": 0, "sgd": 1, "noisy_sgd": 2}[method], -batch, sigma)
