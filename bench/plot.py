"""Plots drawn from a benchmark CSV, never by hand: ``plot_csv(csv) -> png``.

The figure depends on the CSV's mode column:
- models: per model, bars of the step-time ratio to torch (p20-p80 whiskers) with the FLOP
  floor as a dashed line, and bars of the memory ratio;
- host: per model, aten ops / torch, host syncs per step and host time / torch
  (``bench/host.py``);
- scaling-batch / scaling-seq / logical: per model, a metric against the swept size x, one
  line per provider (step time and peak memory; samples/s for the logical batch);
- anything else (kernels): per op, median against x, one line per provider and metric.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastdp.bench.table import read_csv  # noqa: E402


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _models_figure(rows: list[dict]):
    models = list(dict.fromkeys(r["model"] for r in rows if r["metric"] == "ratio_time"))
    fig, axes = plt.subplots(2, max(1, len(models)), figsize=(4.2 * max(1, len(models)), 7.5))
    axes = [[a] for a in axes] if len(models) <= 1 else [list(a) for a in axes]
    for j, model in enumerate(models):
        for i, metric in enumerate(("ratio_time", "ratio_mem")):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == model and r["metric"] == metric]
            sel = [r for r in sel if _finite(r["median"])]
            names = [r["provider"] for r in sel]
            medians = [r["median"] for r in sel]
            low = [max(r["median"] - r["p20"], 0) for r in sel]
            high = [max(r["p80"] - r["median"], 0) for r in sel]
            ax.bar(range(len(sel)), medians, yerr=[low, high], color="tab:blue", capsize=3)
            ax.axhline(1.0, color="black", lw=0.8)
            floor = [r for r in rows if r["model"] == model and r["metric"] == "flop_floor"]
            if metric == "ratio_time" and floor:
                ax.axhline(floor[0]["median"], color="tab:red", ls="--", label="FLOP floor")
                ax.legend(fontsize=8)
            ax.set_xticks(range(len(sel)), names, rotation=60, ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.set_title(f"{model}: {'step time' if i == 0 else 'peak memory'} / torch")
    return fig


def _panel(row: dict) -> str:
    """Sweeps of one model over different axes get their own panels."""
    return row["model"] + (" vs seq_len" if row["mode"] == "scaling-seq" else "")


def _sweep_figure(rows: list[dict], metrics: tuple[str, ...]):
    models = list(dict.fromkeys(_panel(r) for r in rows if r["metric"] in metrics))
    ncols = max(1, len(models))
    fig, axes = plt.subplots(len(metrics), ncols, figsize=(4.5 * ncols, 3.6 * len(metrics)))
    grid = [[axes]] if len(metrics) == 1 and ncols == 1 else None
    if grid is None:
        if len(metrics) == 1:
            grid = [list(axes)]
        elif ncols == 1:
            grid = [[a] for a in axes]
        else:
            grid = [list(a) for a in axes]
    for j, model in enumerate(models):
        for i, metric in enumerate(metrics):
            ax = grid[i][j]
            lines: dict[str, list] = defaultdict(list)
            unit = ""
            for r in rows:
                if _panel(r) == model and r["metric"] == metric and _finite(r["x"]):
                    if _finite(r["median"]):
                        lines[r["provider"]].append((float(r["x"]), r["median"]))
                        unit = r["unit"]
            for provider, pts in lines.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            if any(p[1] > 0 for pts in lines.values() for p in pts):
                ax.set_yscale("log")
            ax.set_title(f"{model}: {metric}", fontsize=10)
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)
    return fig


def _bars_figure(rows: list[dict], metric: str = "time"):
    """Kernel rows: per op, horizontal bars of ``metric`` per shape (x), one per provider."""
    ops = list(dict.fromkeys(r["model"] for r in rows if r["metric"] == metric)) or [""]
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, 2.5 + 1.2 * len(ops) * 2), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        sel = [r for r in rows if r["model"] == op and r["metric"] == metric]
        shapes = list(dict.fromkeys(str(r["x"]) for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        height = 0.8 / max(1, len(providers))
        for k, provider in enumerate(providers):
            values = {str(r["x"]): r["median"] for r in sel if r["provider"] == provider}
            ys = [i + k * height for i in range(len(shapes))]
            ax.barh(ys, [values.get(s, 0.0) for s in shapes], height=height, label=provider)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(shapes))], shapes, fontsize=7)
        ax.set_xlabel(sel[0]["unit"] if sel else "")
        ax.set_title(f"{op}: {metric}", fontsize=10)
        ax.legend(fontsize=7)
    return fig


def plot_csv(csv_path: Path, png_path: Path | None = None) -> Path:
    """Draw the figure of ``csv_path`` into ``png_path`` (default: same stem, .png)."""
    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path else csv_path.with_suffix(".png")
    rows = read_csv(csv_path)
    modes = {r["mode"] for r in rows}
    if modes == {"models"}:
        fig = _models_figure(rows)
    elif modes == {"host"}:
        from fastdp.bench.host import figure

        fig = figure(rows)
    elif modes & {"scaling-batch", "scaling-seq"}:
        fig = _sweep_figure(rows, ("step_time", "ratio_time", "peak_mem"))
    elif modes == {"logical"}:
        fig = _sweep_figure(rows, ("samples_per_s", "peak_mem"))
    else:
        fig = _bars_figure(rows)
    title = rows[0]["device"] if rows else ""
    fig.suptitle(f"{csv_path.stem}  ({title})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
