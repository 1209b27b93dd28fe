"""The benchmark runner: build providers, measure memory, time interleaved repeats, emit rows.

Timing. Every provider is built and warmed up first; then ``repeats`` rounds each time one
block of ``inner`` steps per provider, in an order rotated every round (interleaved), so slow
drifts of the machine (other processes, clocks) hit every provider alike. Blocks are timed
with ``time.perf_counter`` on CPU and CUDA events on GPU. Reported: median, p20 and p80 over
the rounds of the per-step time, of samples/s, and of the ratio to ``torch`` formed round by
round (the ratio of two blocks measured seconds apart); likewise every fastdp provider's ratio
to ``opacus-hooks`` where that ran.

Memory. On GPU: ``torch.cuda.max_memory_allocated`` minus the allocation before the provider
was built. On CPU: the peak RSS delta of the process (VmHWM - VmRSS from /proc/self/status)
from just before the provider is built through its warm-up steps. ``ru_maxrss`` only ever
grows, so instead the kernel's high-water mark is reset before each provider by writing "5"
to /proc/self/clear_refs, and glibc is asked to return its free pages first (malloc_trim),
so memory a previous provider freed is not silently reused without being counted. The
providers built before stay alive but idle, so their resident pages are in the baseline.
Each number therefore covers parameters, gradients or DP accumulators, optimizer state and
the activations of one step. Where the high-water mark cannot be reset the row says so.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdp.bench.flops import flop_floor
from fastdp.bench.workloads import BASELINE, ModelSpec, Step, build_step, model_loss
from fastdp.bench.zoo import fallback_cost, fallback_modules

MIB = 2**20


@dataclass
class RunConfig:
    """How one benchmark run measures."""

    device: torch.device
    mode: str = "models"
    warmup: int = 2
    repeats: int = 5
    block_s: float = 0.2  # target seconds per timed block; inner steps chosen from warm-up
    interleave: bool = True  # False: build, time and free one provider at a time
    floor: bool = True
    command: str = ""


# ---- environment -----------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """Human-readable device: the GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Short file-name form of the device, e.g. ``cpu2t`` or ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu{torch.get_num_threads()}t"


def git_commit() -> str:
    """Short commit of the checkout the package runs from, '+dirty' if tracked files changed."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode
    except OSError:
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def environment(device: torch.device, command: str = "") -> dict:
    """The columns every row of a run shares."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    try:
        import opacus

        opacus_version = opacus.__version__
    except Exception:
        opacus_version = "none"
    return dict(
        device=device_name(device),
        torch=torch.__version__,
        triton=triton_version,
        opacus=opacus_version,
        commit=git_commit(),
        timestamp=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=command,
    )


# ---- memory -----------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak memory between ``start()`` and ``stop()`` in bytes (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.valid = True

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        self.base = _proc_status_kib("VmRSS") * 1024
        self.valid = _reset_rss_peak()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device) - self.base)
        if not self.valid:
            return float("nan")
        return float(_proc_status_kib("VmHWM") * 1024 - self.base)


# ---- timing -----------------------------------------------------------------------------------
def time_block(step: Step, inner: int, device: torch.device) -> float:
    """Seconds per step over ``inner`` back-to-back steps."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(inner):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / inner
    begin = time.perf_counter()
    for _ in range(inner):
        step()
    return (time.perf_counter() - begin) / inner


def quantiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, p20, p80); NaNs when empty."""
    data = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    median, p20, p80 = np.percentile(data, [50, 20, 80])
    return float(median), float(p20), float(p80)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means the batch does not fit."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(err).lower()


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:200]


# ---- one measurement point --------------------------------------------------------------------
def measure_point(
    spec: ModelSpec,
    providers: list[str],
    batch_size: int,
    seq_len: int,
    cfg: RunConfig,
    env: dict,
    tick: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """Rows for every provider at one (model, batch size, sequence length).

    ``tick(label)`` is called after each unit of work (for the progress bar): once per
    provider built and once per provider per round.
    """
    device = cfg.device
    x, y = spec.batch(batch_size, seq_len, device)
    common = dict(env, model=spec.name, mode=cfg.mode, batch_size=batch_size, seq_len=seq_len)
    rows: list[dict] = []
    if cfg.floor:
        floor = flop_floor(spec.build().to(device), x, y, lambda out, t: model_loss(spec, out, t))
        value = (floor.ratio,) * 3
        rows.append(make_row(common, "floor", "flop_floor", "x", value, 1, floor.describe()))
        flops = (floor.nonprivate_flops / 1e9,) * 3
        rows.append(make_row(common, "torch", "gflop_per_step", "GFLOP", flops, 1, ""))

    steps: dict[str, Step] = {}
    inner: dict[str, int] = {}
    memory: dict[str, float] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {p: [] for p in providers}

    def prepare(provider: str) -> None:
        probe = MemoryProbe(device)
        probe.start()
        try:
            step = build_step(spec, provider, x, y, device)
            for _ in range(max(cfg.warmup - 1, 0)):
                step()
            last = time_block(step, 1, device)
        except Exception as err:  # opacus refusing a layer, OOM, ...
            errors[provider] = ("OOM: " if is_oom(err) else "") + _short(err)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        memory[provider] = probe.stop()
        if not probe.valid:
            errors.setdefault(provider + ":mem", "RSS peak cannot be reset here")
        steps[provider] = step
        inner[provider] = max(1, round(cfg.block_s / max(last, 1e-9)))
        tick(f"{spec.name}/{provider} built")

    def time_round(order: list[str]) -> None:
        for provider in order:
            if provider in steps:
                try:
                    times[provider].append(time_block(steps[provider], inner[provider], device))
                except Exception as err:
                    errors[provider] = _short(err)
                    del steps[provider]
            tick(f"{spec.name}/{provider}")

    if cfg.interleave:
        for provider in providers:
            prepare(provider)
        for r in range(cfg.repeats):
            shift = r % len(providers)
            time_round(providers[shift:] + providers[:shift])
        steps.clear()
    else:
        for provider in providers:
            prepare(provider)
            for _ in range(cfg.repeats):
                time_round([provider])
            steps.pop(provider, None)
    gc.collect()

    base_times = times.get(BASELINE, [])
    base_mem = memory.get(BASELINE, float("nan"))
    for provider in providers:
        if provider in errors and not times[provider]:
            nan3 = (float("nan"),) * 3
            rows.append(make_row(common, provider, "error", "", nan3, 0, errors[provider]))
            continue
        t = times[provider]
        note = errors.get(provider, "") or errors.get(provider + ":mem", "")
        n = len(t)
        rows.append(make_row(common, provider, "step_time", "s", quantiles(t), n, note))
        rate = quantiles(batch_size / v for v in t)
        rows.append(make_row(common, provider, "samples_per_s", "samples/s", rate, n, note))
        if base_times:
            ratios = [a / b for a, b in zip(t, base_times)]
            rows.append(make_row(common, provider, "ratio_time", "x", quantiles(ratios), n, note))
        hooks = times.get("opacus-hooks", [])
        if provider.startswith("fastdp-") and hooks and len(hooks) == n:
            # fastdp / Opacus hooks formed round by round (the two blocks of one round)
            paired = quantiles(a / b for a, b in zip(t, hooks))
            rows.append(make_row(common, provider, "ratio_opacus_hooks", "x", paired, n, note))
        mem = memory.get(provider, float("nan"))
        rows.append(make_row(common, provider, "peak_mem", "MiB", (mem / MIB,) * 3, 1, note))
        if np.isfinite(base_mem) and base_mem > 0:
            mem_ratio = (mem / base_mem,) * 3
            rows.append(make_row(common, provider, "ratio_mem", "x", mem_ratio, 1, note))
    return rows


def _fallback_note(names: list[str]) -> str:
    """'on the fallback: 9 LlamaRMSNorm (e.g. model.norm)' from ``name (Type)`` entries."""
    if not names:
        return "no module on the fallback"
    by_kind: dict[str, list[str]] = {}
    for entry in names:
        name, kind = entry.rsplit(" ", 1)
        by_kind.setdefault(kind.strip("()"), []).append(name)
    parts = [
        f"{found[0]} ({kind})" if len(found) == 1 else f"{len(found)} {kind} (e.g. {found[0]})"
        for kind, found in by_kind.items()
    ]
    return "on the fallback: " + ", ".join(parts)


def measure_fallback(
    spec: ModelSpec,
    cfg: RunConfig,
    env: dict,
    provider: str = "fastdp-flat",
    steps: int = 3,
    tick: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """The cost of fastdp's torch.func fallback in ``provider``'s step at the spec's size.

    The fallback rule's ``norm_sq`` (per-sample gradients by vmap over the replayed forward,
    and their norms) and ``accumulate`` are timed inside ``steps`` DP steps after warm-up.
    Rows: ``fallback_time`` (s per step), ``fallback_share`` (of the step time); the note
    names the modules on the fallback. No module on the fallback: zeros, no timing. Its
    replayed forward also runs once in the ordinary forward, which is not counted here.
    """
    device = cfg.device
    x, y = spec.batch(spec.batch_size, spec.seq_len, device)
    common = dict(
        env, model=spec.name, mode=cfg.mode, batch_size=spec.batch_size, seq_len=spec.seq_len
    )
    names = fallback_modules(spec.build())
    note = _fallback_note(names)
    if not names:
        zero = (0.0,) * 3
        return [
            make_row(common, provider, "fallback_time", "s", zero, 0, note),
            make_row(common, provider, "fallback_share", "x", zero, 0, note),
        ]
    try:
        step = build_step(spec, provider, x, y, device)
        for _ in range(max(cfg.warmup, 1)):
            step()
        per_step, total = fallback_cost(step, steps, device)
    except Exception as err:
        nan3 = (float("nan"),) * 3
        return [make_row(common, provider, "fallback_error", "", nan3, 0, _short(err))]
    finally:
        gc.collect()
    tick(f"{spec.name}/fallback")
    return [
        make_row(common, provider, "fallback_time", "s", (per_step,) * 3, steps, note),
        make_row(common, provider, "fallback_share", "x", (per_step / total,) * 3, steps, note),
    ]


def make_row(
    common: dict, provider: str, metric: str, unit: str, values, n: int, note: str
) -> dict:
    """One long-format row: ``common`` columns plus this measurement's (median, p20, p80)."""
    median, p20, p80 = values
    return dict(
        common, provider=provider, metric=metric, unit=unit, median=median, p20=p20, p80=p80,
        n=n, note=note,
    )  # fmt: skip
