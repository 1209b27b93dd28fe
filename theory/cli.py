"""`fastdp theory lls|dln [--quick] [--out DIR] [--seeds N] [--steps N]`.

Runs the linear-least-squares or the diagonal-linear-network experiment, shows a progress bar,
and writes into DIR: results.csv (the comparison table), a companion CSV (standard errors for
lls, per-sigma summary for dln), config.json (every size used, wall time) and PNG figures.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from fastdp.theory import dln_report, lls_report

LLS_PRESETS = {
    "full": lls_report.LLSConfig(chains=400, steps=40_000, over_chains=400),
    "quick": lls_report.LLSConfig(
        chains=100, steps=8000, burn_in=1000, over_chains=100, over_steps=150
    ),
}
DLN_PRESETS = {
    "full": dln_report.DLNConfig(),
    "quick": dln_report.DLNConfig(seeds=4, steps=20_000),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so tests and docs can inspect the options)."""
    parser = argparse.ArgumentParser(
        prog="fastdp theory", description="Continuous-time Noisy-SGD models (Sander et al. 2024)."
    )
    parser.add_argument("model", choices=["lls", "dln"], help="linear least squares | DLN")
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--seeds", type=int, default=None, help="dln: problem instances; lls: parallel chains"
    )
    parser.add_argument("--steps", type=int, default=None, help="iterations per simulation")
    parser.add_argument(
        "--magnitude", type=float, default=None, help="dln: |beta_star| on the support (1.0)"
    )
    parser.add_argument(
        "--step-scale", type=float, default=None, help="dln: gamma in units of the paper's (1.0)"
    )
    return parser


def main(argv: list[str]) -> int:
    """Entry point called by ``fastdp theory``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    out = args.out or Path("results") / "theory" / args.model
    out.mkdir(parents=True, exist_ok=True)
    preset = "quick" if args.quick else "full"
    start = time.perf_counter()
    if args.model == "lls":
        cfg = LLS_PRESETS[preset]
        if args.seeds is not None:
            cfg = dataclasses.replace(cfg, chains=args.seeds, over_chains=args.seeds)
        if args.steps is not None:
            cfg = dataclasses.replace(cfg, steps=args.steps, burn_in=min(cfg.burn_in, args.steps))
        _run_lls(cfg, out)
    else:
        cfg = DLN_PRESETS[preset]
        if args.seeds is not None:
            cfg = dataclasses.replace(cfg, seeds=args.seeds)
        if args.steps is not None:
            cfg = dataclasses.replace(cfg, steps=args.steps, log_every=max(1, args.steps // 1000))
        if args.magnitude is not None:
            cfg = dataclasses.replace(cfg, magnitude=args.magnitude)
        if args.step_scale is not None:
            cfg = dataclasses.replace(cfg, step_scale=args.step_scale)
        _run_dln(cfg, out)
    wall = time.perf_counter() - start
    config = {"model": args.model, "preset": preset, "wall_seconds": round(wall, 1)}
    config.update(dataclasses.asdict(cfg))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out}/ in {wall:.1f} s")
    return 0


def _run_lls(cfg: lls_report.LLSConfig, out: Path) -> None:
    from fastdp.theory import plots

    report = lls_report.LLSReport()
    stages = list(lls_report.stages(cfg, report))
    for name, stage in tqdm(stages, desc="fastdp theory lls", unit="stage"):
        tqdm.write(f"  {name}")
        stage()
    _write_csv(out / "results.csv", report.rows, ["quantity", "predicted", "measured"])
    _write_csv(
        out / "stderr.csv",
        [{"quantity": q, "stderr": se} for q, se in report.stderr.items()],
        ["quantity", "stderr"],
    )
    plots.plot_lls(report, out)
    print(f"{'quantity':<52} {'predicted':>12} {'measured':>12} {'stderr':>10}")
    for row in report.rows:
        se = report.stderr[row["quantity"]]
        print(
            f"{row['quantity']:<52} {row['predicted']:>12.5g} {row['measured']:>12.5g} {se:>10.2g}"
        )


def _run_dln(cfg: dln_report.DLNConfig, out: Path) -> None:
    from fastdp.theory import plots

    with tqdm(total=dln_report.total_steps(cfg), desc="fastdp theory dln", unit="step") as bar:
        report = dln_report.run(cfg, progress=bar.update)
    _write_csv(out / "results.csv", report.rows, list(report.rows[0]))
    summary = dln_report.summarise(report.rows)
    _write_csv(out / "summary.csv", summary, list(summary[0]))
    plots.plot_dln(report, out)
    print(
        f"{'method':<10} {'B':>3} {'sigma':>5} {'div':>4} {'mean dist':>10} {'s.e.':>8} "
        f"{'median':>9} {'alpha_inf':>9} {'d(mirror)':>9} {'<sgd':>4} {'vs sgd':>7}"
    )
    for s in summary:
        print(
            f"{s['method']:<10} {s['batch']:>3} {s['sigma']:>5.2f} {s['diverged']:>4} "
            f"{s['mean_distance']:>10.4g} {s['stderr_distance']:>8.2g} "
            f"{s['median_distance']:>9.4g} {s['mean_alpha_inf']:>9.3g} "
            f"{s['mean_dist_to_mirror_alpha_inf']:>9.3g} {s['closer_than_sgd']:>4} "
            f"{s['geomean_ratio_to_sgd']:>7.3g}"
        )


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row[k]) for k in columns})


def _fmt(value: object) -> object:
    if isinstance(value, float):  # also numpy.float64, whose repr would leak into the CSV
        return "nan" if math.isnan(value) else repr(float(value))
    return value
