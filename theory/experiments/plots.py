"""PNG plots drawn from results.csv and curves.csv (never from in-memory state).

- ``accuracy_vs_batch.png``: final test accuracy against B (log2 axis), one colour per
  algorithm: mean over seeds with a ±std bar and every seed as a dot; a second panel for the
  EMA weights when the sweep used EMA.
- ``accuracy_vs_step.png``: one panel per algorithm, test accuracy against the logical step,
  one line per B (mean over seeds, band = min..max over seeds); ``accuracy_vs_step_ema.png``
  the same for the EMA weights when the sweep used EMA.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fastdp.theory.experiments.results import (  # noqa: E402
    CURVES_FILE,
    RESULTS_FILE,
    algorithm_order,
    group,
    mean_std,
    read_rows,
    row_label,
)

COLORS = {"sgd": "tab:blue", "noisy_sgd": "tab:orange", "dp_sgd": "tab:green"}


def _title(rows: list[dict[str, str]]) -> str:
    first = rows[0]
    ratio = max(float(r.get("noise_ratio") or 0) for r in rows)
    return (
        f"{first['dataset']} / {first['model']}, S = {first['steps']}, "
        f"sigma/B = {ratio:g} (noisy runs), lr = {first['lr']}, EMA = {first['ema']}"
    )


def plot_accuracy_vs_batch(rows: list[dict[str, str]], path: str | Path) -> None:
    """Test accuracy against batch size per algorithm, with the seed spread."""
    metrics = ["test_accuracy"]
    if group(rows, "ema_test_accuracy"):
        metrics.append("ema_test_accuracy")
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        table = group(rows, metric)
        for algorithm in sorted(table, key=algorithm_order):
            by_b = table[algorithm]
            batches = sorted(by_b)
            stats = [mean_std(by_b[b].values()) for b in batches]
            color = COLORS.get(algorithm)
            ax.errorbar(
                batches,
                [100 * m for m, _, _ in stats],
                yerr=[100 * s for _, s, _ in stats],
                color=color,
                marker="o",
                capsize=3,
                label=algorithm,
            )
            for b in batches:
                values = list(by_b[b].values())
                ax.scatter(
                    [b] * len(values), [100 * v for v in values], color=color, s=9, alpha=0.5
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B (sigma/B fixed)")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(_title(rows), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_step(
    curve_rows: list[dict[str, str]], path: str | Path, metric: str = "test_accuracy"
) -> None:
    """Test accuracy (or ``metric``) against the step, one panel per algorithm, one line
    per B."""
    # (algorithm, B, seed, step) -> accuracy, later rows winning (a rerun after a crash).
    points: dict[tuple[str, int, int, int], float] = {}
    for row in curve_rows:
        key = (row_label(row), int(row["batch_size"]), int(row["seed"]), int(row["step"]))
        points[key] = float(row[metric])
    algorithms = sorted({k[0] for k in points}, key=algorithm_order)
    batches = sorted({k[1] for k in points})
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(
        1, len(algorithms), figsize=(4.5 * len(algorithms), 3.8), sharey=True, squeeze=False
    )
    for ax, algorithm in zip(axes[0], algorithms):
        for i, b in enumerate(batches):
            per_step: dict[int, list[float]] = defaultdict(list)
            for (a, bb, _, step), acc in points.items():
                if a == algorithm and bb == b:
                    per_step[step].append(100 * acc)
            if not per_step:
                continue
            steps = sorted(per_step)
            color = cmap(i / max(1, len(batches) - 1))
            mean = [float(np.mean(per_step[s])) for s in steps]
            ax.plot(steps, mean, color=color, marker=".", label=f"B={b}")
            ax.fill_between(
                steps,
                [min(per_step[s]) for s in steps],
                [max(per_step[s]) for s in steps],
                color=color,
                alpha=0.15,
            )
        ax.set_title(algorithm)
        ax.set_xlabel("logical step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric.replace('_', ' ')} (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dir(out_dir: str | Path, keys: set[tuple[str, ...]] | None = None) -> list[Path]:
    """Draw both plots from the CSV files in ``out_dir`` (restricted to run ``keys``)."""
    from fastdp.theory.experiments.protocol import KEY_COLUMNS

    out = Path(out_dir)

    def keep(row: dict[str, str]) -> bool:
        return keys is None or tuple(row.get(c, "") for c in KEY_COLUMNS) in keys

    rows = [r for r in read_rows(out / RESULTS_FILE) if keep(r)]
    curves = [r for r in read_rows(out / CURVES_FILE) if keep(r)]
    written = []
    if rows:
        plot_accuracy_vs_batch(rows, out / "accuracy_vs_batch.png")
        written.append(out / "accuracy_vs_batch.png")
    if curves and not all(math.isnan(float(r["test_accuracy"])) for r in curves):
        plot_accuracy_vs_step(curves, out / "accuracy_vs_step.png")
        written.append(out / "accuracy_vs_step.png")
    if curves and not all(math.isnan(float(r["ema_test_accuracy"])) for r in curves):
        plot_accuracy_vs_step(curves, out / "accuracy_vs_step_ema.png", "ema_test_accuracy")
        written.append(out / "accuracy_vs_step_ema.png")
    return written


# The paper's ImageNet top-1 (Sander et al. 2024, NF-ResNet, S = 72k, sigma/B = 6e-4).
PAPER_IMAGENET = {
    "batch_sizes": (128, 256, 512, 1024),
    "noisy_sgd": (59.8, 57.2, 54.3, 50.8),
    "sgd": (59.3, 56.5, 54.0, 50.7),
}


def plot_against_paper(
    rows: list[dict[str, str]], path: str | Path, metric: str = "ema_test_accuracy"
) -> None:
    """Accuracy minus its value at the smallest B, against B: the paper's ImageNet numbers
    beside this sweep's sgd and noisy_sgd (mean over seeds), so the slopes compare."""
    table = group(rows, metric)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for algorithm, style in (("sgd", "-"), ("noisy_sgd", "--")):
        paper = np.array(PAPER_IMAGENET[algorithm])
        ax.plot(PAPER_IMAGENET["batch_sizes"], paper - paper[0], style, color="gray",
                marker="s", label=f"paper ImageNet {algorithm}")  # fmt: skip
        by_b = table.get(algorithm, {})
        batches = sorted(by_b)
        if not batches:
            continue
        means = np.array([100 * mean_std(by_b[b].values())[0] for b in batches])
        ax.plot(batches, means - means[0], style, color=COLORS[algorithm], marker="o",
                label=f"MNIST-1D {algorithm}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("batch size B (sigma/B and S fixed)")
    ax.set_ylabel("accuracy change from the smallest B (points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
