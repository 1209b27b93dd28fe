"""``fastdp bench``: throughput and memory of private training against torch and Opacus.

    fastdp bench [models] [--quick]     every model x provider at one size (+ kernels if built)
    fastdp bench models --models zoo --tag zoo --no-kernels
                                        GPT-2, Llama, ResNet-18-GN, ViT, T5 (bench/zoo.py), with the
                                        torch.func fallback's share of the fastdp-flat step
    fastdp bench scaling [--quick]      batch size to the largest that fits; GPT sequence length
    fastdp bench logical [--quick]      DP step as the logical batch grows, physical batch fixed
    fastdp bench kernels [--quick]      the kernel micro-benchmarks (bench/bench_<kernel>.py)
    fastdp bench all [--quick]          all of the above
    fastdp bench plot FILE.csv          redraw the PNG of a CSV
    fastdp bench report                 regenerate bench/results/README.md from the CSVs
    fastdp bench compile [--arch 80,90]  compile every Triton kernel for sm_80/sm_90 (no GPU
                                        needed): bench/results/compile-triton<version>.csv
    fastdp bench host [--models gpt2,cnn,mlp] [--modes torch,flat,none,...] [--quick]
                                        aten ops, host syncs and host time per step at
                                        negligible width (bench/host.py): host-<device>.csv

Each measuring mode writes ``<mode>-<device>[-quick].csv`` and a PNG drawn from it into
``--out`` (default ``bench-results``) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from fastdp.bench.harness import (
    RunConfig,
    device_slug,
    environment,
    measure_fallback,
    measure_point,
)
from fastdp.bench.plot import plot_csv
from fastdp.bench.report import fallback_section
from fastdp.bench.scaling import batch_scaling, doublings, logical_scaling, seq_scaling
from fastdp.bench.table import format_table, write_csv
from fastdp.bench.workloads import (
    MODEL_NAMES,
    PRESETS,
    PROVIDERS,
    parse_overrides,
    resolve_specs,
)
from fastdp.bench.zoo import ZOO, available

MODES = ("models", "scaling", "logical", "kernels", "all", "plot", "report", "compile", "host")
KERNEL_BENCHES = (
    "bench_per_sample_norm",
    "bench_clipped_grad",
    "bench_noisy_update",
    "bench_noise",
)
SCALING_PROVIDERS = ["torch", "fastdp-flat", "fastdp-none", "opacus-ghost"]
LOGICAL_PROVIDERS = ["torch", "fastdp-flat"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdp bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="models", choices=MODES)
    parser.add_argument("files", nargs="*", help="CSV files (plot) or results folder (report)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (<3 min)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model sizes (default by device)")
    parser.add_argument(
        "--models", default="mlp,cnn,gpt",
        help=f"comma list of {','.join(MODEL_NAMES)}; 'zoo' = {','.join(ZOO)} (transformers "
        "models are skipped when transformers is absent)",
    )  # fmt: skip
    parser.add_argument(
        "--tag", help="name part of the CSV, e.g. --tag zoo writes models-zoo-cpu1t.csv"
    )
    parser.add_argument("--providers", help=f"comma list of {','.join(PROVIDERS)}")
    parser.add_argument(
        "--set", action="append", default=[], metavar="MODEL.ARG=V",
        help="override a size, e.g. gpt.dim=512, mlp.batch_size=64, gpt.seq_len=256",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, help="warm-up steps per provider")
    parser.add_argument("--max-batch", type=int, help="cap of the batch-size sweep")
    parser.add_argument("--logical", help="comma list of logical batch sizes (logical mode)")
    parser.add_argument("--physical", type=int, default=256, help="physical batch (logical)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-kernels", action="store_true", help="models: skip the kernels")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``fastdp bench`` (called by fastdp/cli.py)."""
    if argv[:1] == ["compile"]:  # its own options (bench/compile_report.py)
        from fastdp.bench.compile_report import main as compile_main

        return compile_main(argv[1:])
    if argv[:1] == ["host"]:  # its own options (bench/host.py)
        from fastdp.bench.host import main as host_main

        return host_main(argv[1:])
    args = build_parser().parse_args(argv)
    # Opacus's hooks fire on the first layer, whose input needs no grad: expected, not news.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.mode == "plot":
        for name in args.files:
            print(f"wrote {plot_csv(Path(name))}")
        return 0
    if args.mode == "report":
        from fastdp.bench.report import write_report

        results = Path(args.files[0]) if args.files else Path("bench/results")
        print(f"wrote {write_report(results)}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("quick" if args.quick else "gpu" if gpu else "cpu")
    specs = []
    for spec in resolve_specs(preset, _model_names(args.models), parse_overrides(args.set)):
        reason = available(spec.name)
        if reason:
            print(f"fastdp bench: skipping {spec.name} ({reason})")
            continue
        specs.append(spec)
    cfg = RunConfig(
        device=device,
        warmup=args.warmup or (10 if gpu else 2),
        repeats=args.repeats or (5 if args.quick else 7),
        block_s=0.1 if args.quick else 0.3,
        command=" ".join(["fastdp", "bench", *argv]),
    )
    modes = ["models", "kernels", "scaling", "logical"] if args.mode == "all" else [args.mode]
    if args.mode == "models" and not args.no_kernels and _kernel_modules():
        modes.append("kernels")
    suffix = (f"{args.tag}-" if args.tag else "") + device_slug(device)
    suffix += "-quick" if args.quick else ""
    for mode in modes:
        rows = RUNNERS[mode](args, specs, cfg)
        if not rows:
            continue
        path = write_csv(rows, args.out / f"{mode}-{suffix}.csv")
        print(format_table(rows) if mode != "kernels" else _kernel_summary(rows))
        if mode == "models":
            print("\n".join(fallback_section(rows)))
        print(f"wrote {path}")
        if not args.no_plot:
            print(f"wrote {plot_csv(path)}")
    return 0


def _model_names(text: str) -> list[str]:
    """``--models`` as a list, 'zoo' expanded, duplicates dropped."""
    names: list[str] = []
    for name in text.split(","):
        names += list(ZOO) if name == "zoo" else [name]
    return list(dict.fromkeys(n for n in names if n))


def _providers(args, default: list[str]) -> list[str]:
    chosen = args.providers.split(",") if args.providers else list(default)
    unknown = [p for p in chosen if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; use {', '.join(PROVIDERS)}")
    return chosen


def _progress(total: int, args, desc: str):
    bar = tqdm(total=total, desc=desc, disable=args.no_progress, leave=False, file=sys.stderr)

    def tick(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    return bar, tick


def run_models(args, specs, cfg: RunConfig) -> list[dict]:
    """Every model x provider at the spec's size, interleaved; then, with fastdp-flat among
    the providers, the share of its step spent in the torch.func fallback."""
    providers = _providers(args, list(PROVIDERS))
    env = environment(cfg.device, cfg.command)
    fallback = "fastdp-flat" in providers
    units = len(specs) * (len(providers) * (1 + cfg.repeats) + fallback)
    bar, tick = _progress(units, args, "models")
    rows = []
    with bar:
        for spec in specs:
            rows += measure_point(spec, providers, spec.batch_size, spec.seq_len, cfg, env, tick)
            if fallback:
                rows += measure_fallback(spec, cfg, env, tick=tick)
    return rows


def run_scaling(args, specs, cfg: RunConfig) -> list[dict]:
    """Batch-size sweep per model; sequence-length sweep for the transformer."""
    providers = _providers(args, SCALING_PROVIDERS)
    env = environment(cfg.device, cfg.command)
    gpu = cfg.device.type == "cuda"
    repeats = max(3, cfg.repeats // 2)
    cfg = RunConfig(**{**cfg.__dict__, "repeats": repeats})
    plans = []
    for spec in specs:
        cap = args.max_batch or (1 << 20 if gpu else spec.batch_size * (2 if args.quick else 4))
        plans.append((spec, cap, doublings(max(1, spec.batch_size // 4), cap)))
    lengths = [32, 64, 128] if args.quick else [32, 64, 128, 256, 512]
    if gpu:
        lengths = [128, 256, 512, 1024, 2048, 4096]
    seq_specs = [s for s in specs if s.seq_len]
    units = sum(len(b) for *_, b in plans) + len(lengths) * len(seq_specs)
    bar, tick = _progress(units * len(providers) * (1 + repeats), args, "scaling")
    rows = []
    with bar:
        for spec, cap, batches in plans:
            rows += batch_scaling(spec, providers, batches, cfg, env, cap, tick)
        for spec in seq_specs:
            rows += seq_scaling(spec, providers, lengths, cfg, env, tick)
    return rows


def run_logical(args, specs, cfg: RunConfig) -> list[dict]:
    """Logical batch 256 -> 65,536 (quick: -> 4,096) at a fixed physical batch, on the MLP."""
    providers = _providers(args, LOGICAL_PROVIDERS)
    env = environment(cfg.device, cfg.command)
    mlp = next((s for s in specs if s.name == "mlp"), None)
    if mlp is None:
        mlp = resolve_specs("quick" if args.quick else "cpu", ["mlp"], {})[0]
    if args.logical:
        sizes = [int(v) for v in args.logical.split(",")]
    else:
        sizes = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384, 65536]
    repeats = 3
    cfg = RunConfig(**{**cfg.__dict__, "repeats": repeats})
    bar, tick = _progress(len(sizes) * len(providers) * (1 + repeats), args, "logical")
    with bar:
        return logical_scaling(mlp, providers, sizes, args.physical, cfg, env, tick)


def _kernel_modules() -> list:
    modules = []
    for name in KERNEL_BENCHES:
        try:
            modules.append(importlib.import_module(f"fastdp.bench.{name}"))
        except ModuleNotFoundError as err:
            if err.name != f"fastdp.bench.{name}":  # present but broken: say so, go on
                print(f"fastdp bench: skipping {name} ({type(err).__name__}: {err})")
        except ImportError as err:
            print(f"fastdp bench: skipping {name} ({type(err).__name__}: {err})")
    return modules


def run_kernels(args, specs, cfg: RunConfig) -> list[dict]:
    """Rows of every kernel micro-benchmark present (bench_<kernel>.run(quick))."""
    modules = _kernel_modules()
    if not modules:
        print("fastdp bench kernels: no kernel micro-benchmarks in this version yet")
        return []
    env = environment(cfg.device, cfg.command)
    # The full kernel shapes are GPU sizes (minutes per call on a CPU core): CPU runs quick.
    quick = args.quick or cfg.device.type != "cuda"
    rows = []
    for module in tqdm(modules, desc="kernels", disable=args.no_progress, leave=False):
        for row in module.run(quick=quick):
            rows.append({**env, **row, "mode": "kernels", "device": env["device"]})
    return rows


def _kernel_summary(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        op = r.get("model") or r.get("op", "")
        lines.append(
            f"  {op:<22}{r.get('provider', ''):<16}{r.get('metric', ''):<14}"
            f"{r.get('median', '')!s:>12} {r.get('unit', '')}  {r.get('x', '')}"
        )
    return "\n".join(lines)


RUNNERS = {
    "models": run_models,
    "scaling": run_scaling,
    "logical": run_logical,
    "kernels": run_kernels,
}
