"""``fastdp experiment batch-sweep``: the batch-size sweep at fixed sigma/B and fixed steps.

    fastdp experiment batch-sweep --quick --out /tmp/sweep
    fastdp experiment batch-sweep --out DIR --batch-sizes 32 64 128 --steps 1000 --seeds 3
    fastdp experiment report DIR          # redraw plots and report.md from DIR's CSVs
    fastdp experiment remedies --quick --out /tmp/remedies   # remedies at B = 128 and 1024
    fastdp experiment batch-sweep --validation 500 --batch-sizes 128 --lr ...  # lr tuning

Options left out take the protocol's defaults (``protocol.SweepConfig``), or with ``--quick``
the small preset ``protocol.QUICK``; options given explicitly always win.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastdp.theory.experiments.protocol import (
    ALGORITHMS,
    QUICK,
    REMEDIES,
    REMEDY_DEFAULTS,
    SCHEDULES,
    SweepConfig,
)

# argparse dest -> SweepConfig field
_FIELDS = {
    "dataset": "dataset",
    "model": "model",
    "num_samples": "num_samples",
    "data_seed": "data_seed",
    "batch_sizes": "batch_sizes",
    "steps": "steps",
    "noise_ratio": "noise_ratio",
    "seeds": "seeds",
    "lr": "lr",
    "momentum": "momentum",
    "schedule": "schedule",
    "ema": "ema",
    "max_grad_norm": "max_grad_norm",
    "algorithms": "algorithms",
    "eval_points": "eval_points",
    "max_physical_batch_size": "max_physical_batch_size",
    "remedies": "remedies",
    "lr_ref_batch": "lr_ref_batch",
    "validation": "validation",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdp experiment", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser(
        "batch-sweep",
        help="accuracy against B at fixed sigma/B and steps (sgd, noisy_sgd, dp_sgd)",
    )
    _sweep_options(sweep)
    remedies = sub.add_parser(
        "remedies",
        help="batch-sweep with the large-B remedies (multiplicity, lr scaling) by default, "
        "at B = 128 and 1024 for sgd and noisy_sgd",
    )
    _sweep_options(remedies)
    again = sub.add_parser("report", help="redraw plots and report.md from a sweep folder")
    again.add_argument("out", help="a batch-sweep output folder")
    again.add_argument(
        "--batch-sizes", type=int, nargs="+", help="only these B (e.g. the paper's 128..1024)"
    )
    return parser


def _sweep_options(sweep: argparse.ArgumentParser) -> None:
    sweep.add_argument("--quick", action="store_true", help="small preset (minutes on CPU)")
    sweep.add_argument("--out", default=None, help="output folder (resumable; reuse to resume)")
    sweep.add_argument("--dataset", choices=("mnist1d", "cifar10"))
    sweep.add_argument("--model", help="mlp | conv1d (mnist1d), wrn16_4 (cifar10)")
    sweep.add_argument("--data-dir", help="CIFAR-10 python batches folder")
    sweep.add_argument("--cache-dir", help="MNIST-1D cache (default ~/.cache/fastdp)")
    sweep.add_argument("--num-samples", type=int, help="MNIST-1D samples generated (80%% train)")
    sweep.add_argument("--data-seed", type=int, help="MNIST-1D generator seed")
    sweep.add_argument("--batch-sizes", type=int, nargs="+", help="logical batch sizes B")
    sweep.add_argument("--steps", type=int, help="logical steps S, the same for every B")
    sweep.add_argument("--noise-ratio", type=float, help="sigma / B of the noisy runs")
    sweep.add_argument("--seeds", type=int, help="number of seeds (0 .. N-1)")
    sweep.add_argument("--lr", type=float, help="learning rate, the same for every B")
    sweep.add_argument("--momentum", type=float, help="SGD momentum (default 0)")
    sweep.add_argument("--schedule", choices=SCHEDULES, help="learning rate schedule")
    sweep.add_argument("--ema", type=float, help="EMA decay of the weights, 0 = off (paper 0.999)")
    sweep.add_argument("--max-grad-norm", type=float, help="clip norm C of dp_sgd (default 1)")
    sweep.add_argument("--algorithms", nargs="+", choices=ALGORITHMS)
    sweep.add_argument("--eval-points", type=int, help="test evaluations per run")
    sweep.add_argument("--max-physical-batch-size", type=int, help="micro-batch size cap")
    sweep.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    sweep.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on shared cores)"
    )
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.add_argument("--remedies", nargs="+", choices=tuple(REMEDIES), help="remedies to run")
    sweep.add_argument("--lr-ref-batch", type=int, help="B_ref of the remedies' lr scaling")
    sweep.add_argument(
        "--lr-for",
        nargs="+",
        metavar="ALG=LR",
        help="per-algorithm learning rates (tuned), e.g. sgd=0.5 dp_sgd=4",
    )
    sweep.add_argument(
        "--validation", type=int, help="hold out the last N training samples as the test set"
    )


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """SweepConfig from the defaults, the --quick preset, then the explicit options."""
    values: dict = dict(REMEDY_DEFAULTS) if args.command == "remedies" else {}
    if args.quick:
        values.update(QUICK)
        if args.command == "remedies":
            values["batch_sizes"] = (16, 128)
    for dest, name in _FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    if getattr(args, "lr_for", None):
        pairs = []
        for item in args.lr_for:
            algorithm, _, lr = item.partition("=")
            if algorithm not in ALGORITHMS or not lr:
                raise ValueError(f"--lr-for takes ALG=LR with ALG in {ALGORITHMS}, got {item!r}")
            pairs.append((algorithm, float(lr)))
        values["lrs"] = tuple(pairs)
    return SweepConfig(**values)


def _report(out: str, batch_sizes: list[int] | None = None) -> int:
    """Table and slopes of a sweep folder (restricted to ``batch_sizes``); the plots and
    report.md are redrawn only for the whole sweep."""
    from fastdp.theory.experiments.plots import plot_dir
    from fastdp.theory.experiments.results import RESULTS_FILE, read_rows, report

    rows = read_rows(Path(out) / RESULTS_FILE)
    if batch_sizes:
        rows = [r for r in rows if int(r["batch_size"]) in batch_sizes]
    if not rows:
        print(f"no {RESULTS_FILE} rows in {out}", file=sys.stderr)
        return 1
    text = "## test accuracy (%)\n\n" + report(rows)
    if any(r.get("ema_test_accuracy") not in ("", "nan", None) for r in rows):
        text += "\n\n## EMA test accuracy (%)\n\n" + report(rows, "ema_test_accuracy")
    if not batch_sizes:
        plot_dir(out)
        (Path(out) / "report.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str]) -> int:
    """Entry point called by ``fastdp experiment``."""
    args = _parser().parse_args(argv)
    if args.command == "report":
        return _report(args.out, args.batch_sizes)
    import torch

    from fastdp.theory.experiments.sweep import run_sweep

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastdp experiment batch-sweep: --device cuda but no CUDA device", file=sys.stderr)
        return 1
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"fastdp experiment batch-sweep: {err}", file=sys.stderr)
        return 2
    out = args.out or (f"{args.command}-quick" if args.quick else args.command)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        run_sweep(
            config,
            out,
            device=args.device,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except FileNotFoundError as err:
        print(f"fastdp experiment batch-sweep: {err}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
    return 0
