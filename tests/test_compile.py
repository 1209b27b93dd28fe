"""Every Triton kernel compiled for sm_80 and sm_90 on the CPU, at the launchers' own configs.

The compile runs in one subprocess per architecture (bench/compile_report.py): the test session
imports Triton in interpreter mode (conftest.py), where kernels cannot be compiled. What fails
here would fail on the first launch on an A100 or H100: a compile error, shared memory over the
per-block limit, a spill in a tensor-core matmul, a matmul without tensor-core instructions, a
noisy update without 16-byte vector accesses, a recompile when the logical step changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastdp.kernels import config  # noqa: E402

MATMUL_KERNELS = ("_clipped_grad_kernel", "_norm_direct_kernel", "_norm_ghost_kernel")
TENSOR_CORE_VARIANTS = ("tf32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """{"rows", "errors", "step_compiles"} of both architectures, compiled in parallel."""
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {
        arch: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastdp.bench.compile_report",
                "--arch",
                str(arch),
                "--json",
                str(out / f"{arch}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for arch in (80, 90)
    }
    merged = {"rows": [], "errors": [], "step_compiles": {}}
    for arch, proc in procs.items():
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log[-4000:]
        part = json.loads((out / f"{arch}.json").read_text())
        merged["rows"] += part["rows"]
        merged["errors"] += part["errors"]
        merged["step_compiles"].update(part["step_compiles"])
    return merged


def test_every_kernel_compiles(report):
    assert report["errors"] == []
    compiled = {(r["kernel"], r["arch"]) for r in report["rows"]}
    for kernel in MATMUL_KERNELS + ("_split_reduce_kernel", "_noisy_sgd_kernel",
                                    "_noisy_adamw_kernel"):  # fmt: skip
        assert {(kernel, "sm_80"), (kernel, "sm_90")} <= compiled, kernel


def test_shared_memory_within_the_block_limit(report):
    over = [r for r in report["rows"] if r["shared_bytes"] > r["shared_limit"]]
    assert over == []


def test_no_spills_in_tensor_core_matmuls_on_sm90(report):
    spills = [
        (r["kernel"], r["workload"], r["variant"], r["spill_bytes"])
        for r in report["rows"]
        if r["kernel"] in MATMUL_KERNELS and r["variant"] in TENSOR_CORE_VARIANTS
        and r["arch"] == "sm_90" and r["spill_bytes"]
    ]  # fmt: skip
    assert spills == []


def test_tensor_cores_in_every_matmul_at_bf16_fp16_tf32(report):
    missing = [
        (r["kernel"], r["arch"], r["workload"], r["variant"])
        for r in report["rows"]
        if r["kernel"] in MATMUL_KERNELS and r["variant"] in TENSOR_CORE_VARIANTS
        and r["mma"] + r["wgmma"] == 0
    ]  # fmt: skip
    assert missing == []
    wgmma = [r for r in report["rows"] if r["arch"] == "sm_90" and r["wgmma"]]
    assert {r["kernel"] for r in wgmma} >= {"_clipped_grad_kernel", "_norm_direct_kernel"}


def test_clipped_gemm_reaches_the_occupancy_its_split_assumes(report):
    """config.clipped_grad_plan sizes split-K for ``programs_per_sm``; the compiled kernel
    must fit that many programs per SM, or the waves it planned are not the real ones."""
    rows = [r for r in report["rows"] if r["kernel"] == "_clipped_grad_kernel"]
    assert rows
    for r in rows:
        spec = config.TARGETS[int(r["arch"][3:])]
        torch.backends.cuda.matmul.allow_tf32 = r["variant"] == "tf32"
        try:
            plan = config.clipped_grad_plan(768, 768, 4096, DTYPES[r["variant"]], spec)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        assert f"BLOCK_P={plan.tile.block_m} " in r["config"] + " "
        assert r["programs_per_sm"] >= plan.tile.programs_per_sm, r


def test_noisy_update_moves_16_byte_vectors(report):
    full = [r for r in report["rows"] if "_noisy_" in r["kernel"] and "FULL=True" in r["config"]]
    assert full
    for r in full:
        assert (
            "16B" in r["load_widths"]
            and r["store_widths"].split() == [r["store_widths"].split()[0]]
            and r["store_widths"].startswith("16B:")
        ), r


def test_consecutive_steps_compile_once(report):
    assert report["step_compiles"] == {"80": 1, "90": 1}
