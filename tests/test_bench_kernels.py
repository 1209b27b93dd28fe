"""pytest-benchmark wrappers: the kernel micro-benchmarks and one training step per provider.

    pytest --benchmark-only tests/test_bench_kernels.py     runs and times them
    pytest                                                  skips them (the normal suite)

They time things, so the normal suite must not run them: every test here skips unless
pytest-benchmark is asked to time (``--benchmark-only`` or ``--benchmark-enable``). The
kernel benches (``bench/bench_<kernel>.py``, each ``run(quick) -> rows``) run once each in
their quick form, since they time internally and emit the long-format rows the harness
writes; pytest-benchmark records their wall time and row count. The step benchmarks let
pytest-benchmark calibrate and compare providers on a small MLP.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastdp.bench import workloads

KERNEL_BENCHES = (
    "bench_per_sample_norm",
    "bench_clipped_grad",
    "bench_noisy_update",
    "bench_noise",
)
STEP_SPEC = workloads.ModelSpec("mlp", dict(in_features=784, hidden=256, depth=2), batch_size=64)


@pytest.fixture
def timed(request, benchmark):
    """The ``benchmark`` fixture, or a skip when pytest-benchmark is not asked to time."""
    option = request.config.getoption
    if not (option("benchmark_only", False) or option("benchmark_enable", False)):
        pytest.skip("timing benchmark: run with pytest --benchmark-only")
    return benchmark


@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_kernel_bench(timed, name):
    try:
        module = importlib.import_module(f"fastdp.bench.{name}")
    except ModuleNotFoundError:
        pytest.skip(f"fastdp.bench.{name} is not in this version")
    rows = timed.pedantic(module.run, kwargs={"quick": True}, rounds=1, iterations=1)
    assert rows, f"{name}.run returned no rows"
    for row in rows:
        assert {"provider", "metric", "unit", "median"} <= set(row)
        assert row.get("op") or row.get("model")
    timed.extra_info["rows"] = len(rows)


@pytest.mark.parametrize("provider", workloads.PROVIDERS)
def test_step(timed, provider):
    x, y = STEP_SPEC.batch(STEP_SPEC.batch_size, 0, torch.device("cpu"))
    step = workloads.build_step(STEP_SPEC, provider, x, y, torch.device("cpu"))
    step()  # warm-up outside the timing
    timed.group = "dp-step mlp B=64"
    timed.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
