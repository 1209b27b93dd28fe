"""Compile every Triton kernel for sm_80 / sm_90 on a machine without a GPU, and read the result.

``fastdp bench compile`` writes ``compile-triton<version>.csv``: one row per (kernel, arch,
workload, variant) with registers, spills, shared memory, tensor-core instructions, the width
of global loads and stores, and an occupancy estimate. tests/test_compile.py runs the same
compile and fails on errors, shared memory over the limit and spills where there must be none.

How: a stand-in Triton driver reports the target (``GPUTarget("cuda", 80 | 90, 32)``) and
``config.compile_target`` tells the configs which GPU they plan for; the real launchers then run
on ``meta`` tensors (sizes without storage), and every ``kernel[grid](...)`` compiles through
Triton's own launch-time specialisation (value % 16 and == 1 of integers, 16-byte alignment of
pointers: ``meta`` tensors sit at address 0, like the 512-byte-aligned blocks of torch's CUDA
allocator) and returns the compiled kernel instead of launching it. Registers and spills come
from ``cuobjdump -res-usage`` on the cubin (ptxas ships in the Triton wheel).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdp.kernels import config

KERNEL_MODULES = (
    "fastdp.kernels.per_sample_norm_triton",
    "fastdp.kernels.clipped_grad_triton",
    "fastdp.kernels.noisy_update_triton",
)
GEMM_VARIANTS = ("fp32", "tf32", "bf16", "fp16")
UPDATE_VARIANTS = ("fp32", "bf16", "fp16")
COLUMNS = (
    "kernel", "arch", "workload", "variant", "config", "registers", "spill_bytes",
    "shared_bytes", "shared_limit", "mma", "wgmma", "load_widths", "store_widths",
    "programs_per_sm", "occupancy", "triton",
)  # fmt: skip


class _TargetDriver:
    """The part of Triton's driver the JIT needs to compile (never to launch)."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


@dataclass
class Compiled:
    kernel: str
    constexprs: dict
    compiled: object  # triton CompiledKernel


@contextlib.contextmanager
def compile_only(spec: config.DeviceSpec) -> Iterator[list[Compiled]]:
    """Within this block, launches compile for ``spec`` and are recorded, not run."""
    import importlib

    from triton.runtime import jit
    from triton.runtime.driver import driver

    modules = [importlib.import_module(name) for name in KERNEL_MODULES]
    kernels = [v for m in modules for v in vars(m).values() if isinstance(v, jit.JITFunction)]
    if not kernels:
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): unset it")
    saved_caches = {k: k.device_caches for k in kernels}
    record: list[Compiled] = []
    original_run = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        constexprs = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
        record.append(Compiled(self.fn.__name__, constexprs, compiled))
        return compiled

    for k in kernels:  # per-target caches: the JIT keys them by device only
        k.device_caches = type(k.device_caches)(k.create_binder)
    # the active driver's slot: "_active" behind a property (Triton >= 3.3), else "active"
    slot = "_active" if isinstance(getattr(type(driver), "active", None), property) else "active"
    saved_driver = vars(driver).get(slot)
    setattr(driver, slot, _TargetDriver(spec.arch))
    jit.JITFunction.run = run
    try:
        with config.compile_target(spec):
            yield record
    finally:
        jit.JITFunction.run = original_run
        setattr(driver, slot, saved_driver)
        for k, caches in saved_caches.items():
            k.device_caches = caches


# ---- workloads: the real launchers on meta tensors -----------------------------------------


@contextlib.contextmanager
def _variant(variant: str) -> Iterator[torch.dtype]:
    """The input dtype of ``variant``; "tf32" is float32 with torch's TF32 matmuls allowed."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = variant == "tf32"
    try:
        yield {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
               "fp16": torch.float16}[variant]  # fmt: skip
    finally:
        matmul.allow_tf32 = previous


def _meta(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _linear(batch: int, n_tokens: int, d_in: int, d_out: int) -> Callable[[str], None]:
    """Norms (both methods), then the clipped GEMM with and without bias."""

    def run(variant: str) -> None:
        from fastdp.kernels import clipped_grad_triton, per_sample_norm_triton

        with _variant(variant) as dtype:
            a, g = (
                _meta(batch, n_tokens, d_in, dtype=dtype),
                _meta(batch, n_tokens, d_out, dtype=dtype),
            )
            for method in ("direct", "ghost"):
                per_sample_norm_triton.per_sample_norm_sq(a, g, method)
            out, bias = _meta(d_out, d_in), _meta(d_out)
            clipped_grad_triton.clipped_linear_grad(a, g, _meta(batch), out, bias)
            clipped_grad_triton.clipped_linear_grad(a, g, _meta(batch), out, None)

    return run


GPT2_SMALL = [(50257, 768), (1024, 768)] + 12 * [
    (768,), (768,), (2304, 768), (2304,), (768, 768), (768,),
    (768,), (768,), (3072, 768), (3072,), (768, 3072), (768,),
] + [(768,), (768,)]  # fmt: skip


def _update(shapes: list[tuple[int, ...]]) -> Callable[[str], None]:
    """Noisy SGD (momentum) and AdamW over every tensor, with noise, one call each."""

    def run(variant: str) -> None:
        from fastdp.kernels import noisy_update_triton as nu
        from fastdp.kernels.noise import NoiseKey

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[variant]
        params = [_meta(*s, dtype=dtype) for s in shapes]
        sums = [_meta(*s) for s in shapes]
        states = [[_meta(*s, dtype=dtype) for s in shapes] for _ in range(2)]
        noise = NoiseKey(secret=(1 << 127) + 12345, step=7, std=1.0)
        nu.noisy_sgd_update(params, sums, states[0], lr=0.1, momentum=0.9, noise=noise)
        nu.noisy_adamw_update(params, sums, *states, step_count=3, lr=1e-3, noise=noise)

    return run


@dataclass(frozen=True)
class Workload:
    name: str
    run: Callable[[str], None]
    variants: tuple[str, ...]


WORKLOADS = (
    Workload("linear B=64 T=1024 d=p=768", _linear(64, 1024, 768, 768), GEMM_VARIANTS),
    Workload("linear B=4096 T=1 d=p=768", _linear(4096, 1, 768, 768), GEMM_VARIANTS),
    Workload("update GPT-2 small (124M)", _update(GPT2_SMALL), UPDATE_VARIANTS),
)


# ---- reading a compiled kernel -------------------------------------------------------------

_TOOLS: dict[str, str] = {}


def _cuobjdump() -> str:
    if "cuobjdump" not in _TOOLS:
        import triton

        _TOOLS["cuobjdump"] = str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    return _TOOLS["cuobjdump"]


def resources(cubin: bytes) -> dict[str, int]:
    """REG, LOCAL (bytes of local memory per thread: spills) and SHARED of a cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    found = dict(re.findall(r"\b(REG|LOCAL|STACK|SHARED):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9:]+)*)\s")
_CP_ASYNC = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)"
)


def access_widths(ptx: str) -> tuple[Counter, Counter]:
    """Bytes per global load / store instruction in the PTX, counted (cp.async and TMA too)."""
    loads, stores = Counter(), Counter()
    for op, suffix in _ACCESS.findall(ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 32)
        (loads if op == "ld" else stores)[vec * bits // 8] += 1
    for size in _CP_ASYNC.findall(ptx):
        loads[int(size, 0)] += 1
    loads["tma"] += len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    return loads, stores


def _widths(counter: Counter) -> str:
    keys = sorted((k for k in counter if counter[k]), key=lambda k: (isinstance(k, str), k))
    return " ".join(
        f"{k}B:{counter[k]}" if isinstance(k, int) else f"{k}:{counter[k]}" for k in keys
    )


def occupancy(registers: int, shared: int, num_warps: int, spec: config.DeviceSpec) -> int:
    """Resident programs per SM allowed by registers (256-register warp granules), shared
    memory (+ 1 KiB reserved per block) and warps."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (spec.registers_per_sm // per_warp) // num_warps
    by_shared = spec.shared_per_sm // (shared + 1024)
    return max(0, min(by_regs, by_shared, spec.max_warps_per_sm // num_warps, 32))


def describe(item: Compiled, spec: config.DeviceSpec) -> dict:
    import triton

    kernel = item.compiled
    res = resources(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    loads, stores = access_widths(ptx)
    shared = int(kernel.metadata.shared)
    warps = int(kernel.metadata.num_warps)
    programs = occupancy(res.get("REG", 0), shared, warps, spec)
    shown = {k: v for k, v in item.constexprs.items() if not k.endswith("DTYPE")}
    return {
        "kernel": item.kernel,
        "arch": f"sm_{spec.arch}",
        "config": " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in sorted(shown.items())),
        "registers": res.get("REG", 0),
        "spill_bytes": res.get("LOCAL", 0),
        "shared_bytes": shared,
        "shared_limit": spec.max_shared_per_block,
        "mma": len(re.findall(r"\bmma\.sync\.", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        "load_widths": _widths(loads),
        "store_widths": _widths(stores),
        "programs_per_sm": programs,
        "occupancy": round(programs * warps / spec.max_warps_per_sm, 3),
        "triton": triton.__version__,
    }


def compile_rows(archs=(80, 90), workloads=WORKLOADS, errors: list | None = None) -> list[dict]:
    """One row per distinct compiled kernel of every workload x variant on every arch.

    A compile error is raised, or, with ``errors`` given, appended there as (arch, workload,
    variant, message) and the rest goes on."""
    rows = []
    for arch in archs:
        spec = config.TARGETS[arch]
        for workload in workloads:
            for variant in workload.variants:
                with compile_only(spec) as record:
                    try:
                        workload.run(variant)
                    except Exception as err:  # noqa: BLE001 - reported with its context
                        if errors is None:
                            raise
                        errors.append(
                            (arch, workload.name, variant, f"{type(err).__name__}: {err}")
                        )
                seen = set()
                for item in record:
                    if id(item.compiled) in seen:
                        continue
                    seen.add(id(item.compiled))
                    row = describe(item, spec)
                    rows.append({**row, "workload": workload.name, "variant": variant})
    return [{c: r[c] for c in COLUMNS} for r in rows]


def compilations_across_steps(spec: config.DeviceSpec, steps=(41, 42, 47, 48)) -> int:
    """Kernels compiled by noisy updates at consecutive logical steps (and two run secrets):
    1 when the noise key and step words are not specialised."""
    from fastdp.kernels import noisy_update_triton as nu
    from fastdp.kernels.noise import NoiseKey

    params, sums = [_meta(4096)], [_meta(4096)]
    with compile_only(spec) as record:
        for secret in (1, (1 << 127) + 16):
            for step in steps:
                noise = NoiseKey(secret=secret, step=step, std=1.0)
                nu.noisy_sgd_update(params, sums, [None], lr=0.1, noise=noise)
    return len({id(item.compiled) for item in record})


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown(rows: list[dict]) -> list[str]:
    """The table of a compile CSV for bench/results/README.md."""
    out = [
        f"Static compile report (no GPU): Triton {rows[0]['triton']}, `fastdp bench compile`. "
        "Spills: local memory bytes per thread; loads / stores: bytes per global access "
        "instruction x count (cp.async included); programs/SM and occupancy (warps / 64) "
        "from registers, shared memory and warps.",
        "",
        "| kernel | arch | workload | variant | config | regs | spill B | smem B | mma | wgmma "
        "| loads | stores | programs/SM | occupancy |",
        "|---" * 14 + "|",
    ]
    for r in rows:
        out.append(
            f"| {r['kernel']} | {r['arch']} | {r['workload']} | {r['variant']} | {r['config']} "
            f"| {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['mma']} "
            f"| {r['wgmma']} | {r['load_widths']} | {r['store_widths']} "
            f"| {r['programs_per_sm']} | {r['occupancy']} |"
        )
    return out


def main(argv: list[str]) -> int:
    """``fastdp bench compile [--arch 80,90] [--out bench/results]``."""
    import argparse

    import triton

    parser = argparse.ArgumentParser(prog="fastdp bench compile", description=__doc__)
    parser.add_argument("--arch", default="80,90", help="comma list of compute capabilities")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--json", type=Path, help="write rows, errors, compilations here instead")
    args = parser.parse_args(argv)
    errors: list = []
    archs = tuple(int(a) for a in args.arch.split(","))
    rows = compile_rows(archs, errors=errors)
    if args.json:
        steps = {arch: compilations_across_steps(config.TARGETS[arch]) for arch in archs}
        args.json.write_text(json.dumps({"rows": rows, "errors": errors, "step_compiles": steps}))
        return 0
    path = write_csv(rows, args.out / f"compile-triton{triton.__version__}.csv")
    print(f"wrote {path} ({len(rows)} kernels)")
    from fastdp.bench.report import write_report

    print(f"wrote {write_report(args.out)}")
    for arch, workload, variant, message in errors:
        print(f"FAILED sm_{arch} {workload} {variant}: {message}")
    return 1 if errors else 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
