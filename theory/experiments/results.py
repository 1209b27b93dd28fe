"""results.csv / curves.csv I/O, resumption, and the statistics of the report.

results.csv has one row per finished run (appended and flushed as soon as the run ends, so an
interrupted sweep keeps what it finished); curves.csv has one row per (run, evaluation step).
A run whose key columns (protocol.KEY_COLUMNS) already appear in results.csv is skipped.

Slope of accuracy against log2(B) ("points per doubling of B"), for one algorithm:
- ``slope``: least squares over all (log2 B, accuracy) points of all seeds;
- ``se_seeds``: standard error over seeds (std of the per-seed slopes / sqrt(#seeds));
- ``ci95``: percentile bootstrap over seeds (seeds resampled with replacement, all the batch
  sizes of a seed kept together since they share the initialisation), 2,000 resamples.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fastdp.theory.experiments.protocol import KEY_COLUMNS, RunSpec, fmt
from fastdp.theory.experiments.train import RunResult

RESULT_COLUMNS = (
    "algorithm",
    "batch_size",
    "sigma",
    "steps",
    "seed",
    "lr",
    "test_accuracy",
    "train_loss",
    "epsilon",
    "wall_seconds",
    "ema_test_accuracy",
    "accountant",
    "delta",
    "noise_ratio",
    *(
        c
        for c in KEY_COLUMNS
        if c not in ("algorithm", "batch_size", "sigma", "steps", "seed", "lr")
    ),
)
CURVE_COLUMNS = (*KEY_COLUMNS, "step", "test_accuracy", "ema_test_accuracy")
RESULTS_FILE, CURVES_FILE = "results.csv", "curves.csv"


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings ([] when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def finished_keys(out_dir: str | Path) -> set[tuple[str, ...]]:
    """Keys of the runs already in ``out_dir``/results.csv."""
    rows = read_rows(Path(out_dir) / RESULTS_FILE)
    return {tuple(row.get(c, "") for c in KEY_COLUMNS) for row in rows}


def _append(path: Path, columns: tuple[str, ...], rows: Iterable[dict[str, str]]) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    if not new:  # a file written before columns were added keeps its header
        with open(path, newline="") as handle:
            columns = tuple(next(csv.reader(handle)))
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()


def append_result(out_dir: str | Path, spec: RunSpec, result: RunResult, n_train: int) -> None:
    """Write the run's curve, then its results.csv row (the row marks it finished)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = spec.identity()
    _append(
        out / CURVES_FILE,
        CURVE_COLUMNS,
        (
            {**identity, "step": fmt(s), "test_accuracy": fmt(a), "ema_test_accuracy": fmt(e)}
            for s, a, e in result.curve
        ),
    )
    row = {
        **identity,
        "test_accuracy": fmt(result.test_accuracy),
        "train_loss": fmt(result.train_loss),
        "epsilon": fmt(result.epsilon),
        "wall_seconds": f"{result.wall_seconds:.2f}",
        "ema_test_accuracy": fmt(result.ema_test_accuracy),
        "accountant": result.accountant if spec.algorithm == "dp_sgd" else "",
        "delta": fmt(1.0 / n_train),
        "noise_ratio": fmt(spec.sigma / spec.batch_size),
    }
    _append(out / RESULTS_FILE, RESULT_COLUMNS, [row])


def group(
    rows: list[dict[str, str]], metric: str = "test_accuracy"
) -> dict[str, dict[int, dict[int, float]]]:
    """algorithm -> batch size -> seed -> metric (nan values dropped)."""
    table: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        value = float(row.get(metric) or "nan")
        if math.isnan(value):
            continue
        table[row_label(row)][int(row["batch_size"])][int(row["seed"])] = value
    return {a: dict(by_b) for a, by_b in table.items()}


def row_label(row: dict[str, str]) -> str:
    """algorithm, or algorithm+remedy for a remedy run."""
    remedy = row.get("remedy") or ""
    return row["algorithm"] if not remedy else f"{row['algorithm']}+{remedy}"


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), count)."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        return math.nan, math.nan, 0
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std, int(array.size)


def _ols_slope(x: np.ndarray, y: np.ndarray) -> float:
    x_centered = x - x.mean()
    denominator = float((x_centered**2).sum())
    return float((x_centered * (y - y.mean())).sum() / denominator) if denominator else math.nan


def slope_per_doubling(
    by_batch: dict[int, dict[int, float]], resamples: int = 2000, rng_seed: int = 0
) -> dict[str, float]:
    """Accuracy slope against log2(B) with its uncertainty (see the module docstring)."""
    seeds = sorted({s for per_seed in by_batch.values() for s in per_seed})
    points = [(math.log2(b), s, v) for b, per_seed in by_batch.items() for s, v in per_seed.items()]
    if len({p[0] for p in points}) < 2:
        return {"slope": math.nan, "se_seeds": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    x = np.array([p[0] for p in points])
    y = np.array([p[2] for p in points])
    seed_of = np.array([p[1] for p in points])
    slope = _ols_slope(x, y)
    per_seed = [_ols_slope(x[seed_of == s], y[seed_of == s]) for s in seeds]
    per_seed = [v for v in per_seed if not math.isnan(v)]
    se = float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) > 1 else 0.0
    rng = np.random.default_rng(rng_seed)
    boot = []
    for _ in range(resamples if len(seeds) > 1 else 0):
        pick = rng.choice(seeds, size=len(seeds), replace=True)
        mask_x = np.concatenate([x[seed_of == s] for s in pick])
        mask_y = np.concatenate([y[seed_of == s] for s in pick])
        boot.append(_ols_slope(mask_x, mask_y))
    low, high = np.nanpercentile(boot, [2.5, 97.5]) if boot else (math.nan, math.nan)
    return {"slope": slope, "se_seeds": se, "ci_low": float(low), "ci_high": float(high)}


def report(rows: list[dict[str, str]], metric: str = "test_accuracy") -> str:
    """Markdown table (mean ± std over seeds, in %) and slopes per doubling of B, with the
    paired differences to sgd and dp_sgd's epsilon per B."""
    table = group(rows, metric)
    if not table:
        return f"(no {metric} values)"
    batches = sorted({b for by_b in table.values() for b in by_b})
    eps = group([r for r in rows if r["algorithm"] == "dp_sgd"], "epsilon").get("dp_sgd", {})
    lines = [
        "| algorithm | " + " | ".join(f"B={b}" for b in batches) + " | slope / doubling |",
        "|---" * (len(batches) + 2) + "|",
    ]
    rows_out = [(a, table[a]) for a in sorted(table, key=algorithm_order)]
    rows_out += [(f"{a} - sgd (paired)", d) for a, d in paired_differences(table).items()]
    for label, by_b in rows_out:
        cells = []
        for b in batches:
            mean, std, n = mean_std(by_b.get(b, {}).values())
            cells.append(f"{100 * mean:.2f} ± {100 * std:.2f}" if n else "-")
        fit = slope_per_doubling(by_b)
        slope = (
            f"{100 * fit['slope']:+.2f} (SE {100 * fit['se_seeds']:.2f}; "
            f"95% CI [{100 * fit['ci_low']:+.2f}, {100 * fit['ci_high']:+.2f}])"
        )
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {slope} |")
    if eps:
        cells = [f"{mean_std(eps.get(b, {}).values())[0]:.3g}" for b in batches]
        lines.append("| dp_sgd epsilon | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def paired_differences(
    table: dict[str, dict[int, dict[int, float]]],
) -> dict[str, dict[int, dict[int, float]]]:
    """algorithm -> B -> seed -> (metric - sgd's metric at the same B and seed).

    A seed fixes the initialisation and the sampled batches for every algorithm, so the
    paired difference isolates what clipping and noise change, without the seed spread.
    """
    base = table.get("sgd", {})
    out: dict[str, dict[int, dict[int, float]]] = {}
    for algorithm in sorted(table, key=algorithm_order):
        if algorithm == "sgd":
            continue
        diffs = {
            b: {s: v - base[b][s] for s, v in per_seed.items() if s in base.get(b, {})}
            for b, per_seed in table[algorithm].items()
        }
        diffs = {b: d for b, d in diffs.items() if d}
        if diffs:
            out[algorithm] = diffs
    return out


def algorithm_order(name: str) -> tuple[int, int, str]:
    order = ("sgd", "noisy_sgd", "dp_sgd")
    base, _, remedy = name.partition("+")
    return (order.index(base) if base in order else len(order), bool(remedy), name)


def t_interval(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean (nan below two values)."""
    array = np.asarray(list(values), dtype=float)
    if array.size < 2:
        mean = float(array.mean()) if array.size else math.nan
        return mean, math.nan, math.nan
    from scipy import stats

    half = stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size)
    return float(array.mean()), float(array.mean() - half), float(array.mean() + half)


def remedy_report(rows: list[dict[str, str]], metric: str = "ema_test_accuracy") -> str:
    """Per algorithm+remedy, paired by seed with the algorithm's baseline: the gain at the
    largest B, the deficit (largest B minus smallest B, within the same label), and the
    slope per doubling; 95% t-intervals over seeds (points)."""
    table = group(rows, metric)
    if not table:
        return f"(no {metric} values)"
    batches = sorted({b for by_b in table.values() for b in by_b})
    small, large = batches[0], batches[-1]
    lines = [
        f"| run | B={small} | B={large} | deficit B={large} - B={small} | "
        f"gain at B={large} vs baseline (paired) | slope / doubling |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values) -> str:
        mean, low, high = t_interval(values)
        if math.isnan(low):
            return f"{100 * mean:+.2f}"
        return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"

    for label in sorted(table, key=algorithm_order):
        by_b = table[label]
        base = table.get(label.partition("+")[0], {})
        lo, hi = by_b.get(small, {}), by_b.get(large, {})
        deficit = [hi[s] - lo[s] for s in hi if s in lo]
        gain = [v - base[large][s] for s, v in hi.items() if s in base.get(large, {})]
        slopes = []
        for seed in sorted({s for per in by_b.values() for s in per}):
            points = {b: {seed: per[seed]} for b, per in by_b.items() if seed in per}
            if len(points) > 1:
                slopes.append(slope_per_doubling(points, resamples=0)["slope"])
        means = [f"{100 * mean_std(d.values())[0]:.2f}" if d else "-" for d in (lo, hi)]
        gain_cell = cell(gain) if "+" in label and gain else "-"
        lines.append(
            f"| {label} | {means[0]} | {means[1]} | {cell(deficit) if deficit else '-'} | "
            f"{gain_cell} | {cell(slopes) if slopes else '-'} |"
        )
    return "\n".join(lines)
