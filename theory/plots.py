"""Figures for `fastdp theory lls|dln`, drawn from the reports (never hand-edited).

Matplotlib runs with the Agg backend so the commands work on headless machines.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fastdp.theory.dln_report import DLNReport  # noqa: E402
from fastdp.theory.lls_report import LLSReport  # noqa: E402

_COLORS = {"gd": "black", "sgd": "tab:blue", "noisy_sgd": "tab:red", "minibatch": "tab:green"}


def plot_lls(report: LLSReport, out: Path) -> list[Path]:
    """predicted vs measured scatter, covariance coefficients vs B, Theorem 1 over time."""
    paths = []
    fig, ax = plt.subplots(figsize=(5, 5))
    pred = np.array([r["predicted"] for r in report.rows])
    meas = np.array([r["measured"] for r in report.rows])
    keep = (pred > 0) & (meas > 0)
    ax.loglog(pred[keep], meas[keep], "o", ms=4)
    lo, hi = min(pred[keep].min(), meas[keep].min()), max(pred[keep].max(), meas[keep].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
    ax.set_xlabel("predicted")
    ax.set_ylabel("measured")
    ax.set_title("LLS: every compared quantity")
    ax.legend()
    paths.append(_save(fig, out / "lls_predicted_vs_measured.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if report.split:
        batches = np.array(sorted(report.split))
        tab = [report.split[b] for b in batches]
        for ax, key, title in (
            (axes[0], "a", "SGD term: coefficient of I"),
            (axes[1], "b", "isotropic term: coefficient of H^{-1}"),
        ):
            ax.errorbar(
                batches,
                [t[f"{key}_meas"] for t in tab],
                yerr=[2 * t[f"{key}_se"] for t in tab],
                fmt="o",
                label="discrete Noisy-SGD (±2 s.e.)",
            )
            ax.plot(batches, [t[f"{key}_ou"] for t in tab], "k--", label="OU closed form (1/2)")
            if key == "b":
                ax.plot(
                    batches,
                    [t["b_ou"] / 2 for t in tab],
                    ":",
                    color="tab:red",
                    label="with the paper's 1/4",
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size B (sigma/B fixed)")
            ax.set_title(title)
            ax.legend(fontsize=8)
    paths.append(_save(fig, out / "lls_covariance_vs_batch.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for sigma, (gap, bound, dt) in sorted(report.paths.items()):
        t = dt * np.arange(gap.size)
        (line,) = ax.plot(t, gap, label=f"E||theta-beta||^2, sigma={sigma:g}")
        ax.plot(t, bound, "--", color=line.get_color(), label="bound gamma d sigma^2 int L")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("time t")
    ax.set_title("Theorem 1 (over-parameterised LLS)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "lls_theorem1.png"))
    return paths


def plot_dln(report: DLNReport, out: Path) -> list[Path]:
    """||beta_t - beta*||^2 over time per method, and final distance against sigma."""
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    noisy = report.runs["noisy_sgd"]
    curves = [("gd", report.runs["gd"], 0, _COLORS["gd"], "GD")]
    for name, sim in report.runs.items():
        if name.startswith("sgd_b"):
            curves.append((name, sim, 0, _COLORS["minibatch"], f"SGD, batch {sim.batch}"))
    for k, sigma in enumerate(noisy.sigmas):
        label = "SGD (batch 1)" if sigma == 0 else f"Noisy-SGD sigma={sigma:g}"
        color = _COLORS["sgd"] if sigma == 0 else plt.cm.Reds(0.35 + 0.65 * k / len(noisy.sigmas))
        curves.append(("noisy", noisy, k, color, label))
    for _, sim, k, color, label in curves:
        with warnings.catch_warnings():  # all seeds diverged: NaN is the honest median
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(sim.distance[:, k, :], axis=0)
        ax.plot(np.maximum(sim.log_steps, 1), med, color=color, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("median over seeds of ||beta_t - beta*||^2")
    ax.set_title("DLN sparse regression (diverged runs excluded)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "dln_distance_over_time.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = [r for r in report.rows if r["method"] in ("sgd", "noisy_sgd") and r["batch"] == 1]
    seeds = sorted({r["seed"] for r in rows})
    top = np.nanmax([r["final_distance"] for r in report.rows]) * 1.5
    for seed in seeds:
        mine = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["sigma"])
        sig = [r["sigma"] for r in mine]
        ax.plot(sig, [r["final_distance"] for r in mine], "-", color="0.75", lw=0.8)
        div = [r["sigma"] for r in mine if r["diverged"]]
        ax.plot(div, [top] * len(div), "x", color="tab:red")
    sigmas = sorted({r["sigma"] for r in rows})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = [np.nanmean([r["final_distance"] for r in rows if r["sigma"] == s]) for s in sigmas]
    ax.plot(sigmas, means, "o-", color=_COLORS["noisy_sgd"], label="mean over converged seeds")
    gd = np.mean([r["final_distance"] for r in report.rows if r["method"] == "gd"])
    ax.axhline(gd, color="black", ls="--", label="GD (mean)")
    ax.plot([], [], "x", color="tab:red", label="diverged run (plotted at top)")
    ax.set_yscale("log")
    ax.set_xlabel("sigma")
    ax.set_ylabel("final ||beta - beta*||^2")
    ax.set_title("Noisy-SGD final distance vs sigma (grey: one seed)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "dln_final_distance_vs_sigma.png"))
    return paths


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
