"""Timing and row helpers shared by the kernel micro-benchmarks (bench_<kernel>.py).

CUDA: ``triton.testing.do_bench`` (L2 flushed between runs, quantiles of the kernel time).
Elsewhere: ``time.perf_counter`` around whole calls. Rows are long-format dicts with the keys
op, provider, metric, unit, x, median, p20, p80, device, as the bench harness expects.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

# Dense bf16 tensor-core peak (TFLOP/s) and memory bandwidth (GB/s) from the vendor specs.
_PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def peaks(device: torch.device) -> tuple[float, float] | None:
    """(bf16 TFLOP/s, GB/s) of a known GPU, else None (no fraction_of_peak rows)."""
    name = device_name(device)
    for key, value in _PEAKS.items():
        if key in name:
            return value
    return None


def measure(fn: Callable[[], object], device: torch.device, quick: bool) -> tuple[float, ...]:
    """(median, p20, p80) seconds of one call of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(
            fn, warmup=5 if quick else 25, rep=20 if quick else 100, quantiles=[0.5, 0.2, 0.8]
        )
        return tuple(m / 1e3 for m in ms)
    fn()  # warm-up
    times = []
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def rows_for(
    op: str,
    provider: str,
    x: str,
    seconds: tuple[float, ...],
    device: torch.device,
    *,
    flops: float | None = None,
    bytes_moved: float | None = None,
) -> list[dict]:
    """A time row plus TFLOP/s or GB/s (and fraction_of_peak on a known GPU)."""
    base = dict(op=op, provider=provider, x=x, device=device_name(device))
    median, p20, p80 = seconds
    rows = [dict(base, metric="time", unit="ms", median=median * 1e3, p20=p20 * 1e3,
                 p80=p80 * 1e3)]  # fmt: skip
    known = peaks(device) if device.type == "cuda" else None
    if flops is not None:
        rate = [flops / s / 1e12 for s in (median, p80, p20)]  # slower time -> lower rate
        rows.append(dict(base, metric="TFLOP/s", unit="TFLOP/s", median=rate[0], p20=rate[1],
                         p80=rate[2]))  # fmt: skip
        if known:
            frac = [r / known[0] for r in rate]
            rows.append(dict(base, metric="fraction_of_peak", unit="1", median=frac[0],
                             p20=frac[1], p80=frac[2]))  # fmt: skip
    if bytes_moved is not None:
        rate = [bytes_moved / s / 1e9 for s in (median, p80, p20)]
        rows.append(dict(base, metric="GB/s", unit="GB/s", median=rate[0], p20=rate[1],
                         p80=rate[2]))  # fmt: skip
        if known:
            frac = [r / known[1] for r in rate]
            rows.append(dict(base, metric="fraction_of_peak", unit="1", median=frac[0],
                             p20=frac[1], p80=frac[2]))  # fmt: skip
    return rows


def triton_runs_on(device: torch.device) -> bool:
    """Time the Triton provider only where it is compiled (CUDA); the interpreter is no timing."""
    from fastdp.kernels.dispatch import triton_available

    return device.type == "cuda" and triton_available()


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        print(
            f"{row['op']:<22} {row['provider']:<12} {row['x']:<34} {row['metric']:<16} "
            f"{row['median']:>10.4g} {row['unit']:<8} [p20 {row['p20']:.4g}, p80 {row['p80']:.4g}]"
        )
