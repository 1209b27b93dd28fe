"""Sweeps: batch size to the largest that fits, sequence length, and the logical batch.

- ``batch_scaling``: per model, the physical batch doubles from a start size; a provider
  leaves the sweep at its first out-of-memory and its ``max_batch`` row is the last size that
  ran. On CPU nothing runs out of memory in a sensible time, so the sweep stops at ``cap``
  and the row says "capped". Providers are built, timed and freed one at a time here, so a
  provider's memory is not shared with the others' (interleaving would hold all at once).
- ``seq_scaling``: the transformer at growing sequence length, where ghost norms (cost
  ~T^2) stop paying and the per-layer choice flips to direct; the FLOP floor follows.
- ``logical_scaling``: samples/s and peak memory of a DP step as the logical batch grows
  with the physical batch fixed, through ``make_private``'s loader (fixed logical batches,
  ``max_physical_batch_size``), against non-private gradient accumulation over the same
  micro-batches.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.utils.data import DataLoader, TensorDataset

from fastdp.bench.harness import (
    MIB,
    MemoryProbe,
    RunConfig,
    is_oom,
    make_row,
    measure_point,
    quantiles,
    time_block,
)
from fastdp.bench.workloads import (
    LR,
    MAX_GRAD_NORM,
    NOISE_MULTIPLIER,
    ModelSpec,
    model_loss,
)

Tick = Callable[[str], None]


def doublings(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... up to stop (inclusive)."""
    sizes = []
    size = max(1, start)
    while size <= stop:
        sizes.append(size)
        size *= 2
    return sizes


def batch_scaling(
    spec: ModelSpec,
    providers: list[str],
    batches: list[int],
    cfg: RunConfig,
    env: dict,
    cap: int,
    tick: Tick = lambda _: None,
) -> list[dict]:
    """Rows per batch size (x = batch size) and one ``max_batch`` row per provider."""
    cfg = replace(cfg, interleave=False, mode="scaling-batch")
    alive = list(providers)
    largest: dict[str, int] = {}
    failures: dict[str, str] = {}
    rows: list[dict] = []
    for batch in batches:
        if not alive:
            break
        point = measure_point(spec, alive, batch, spec.seq_len, cfg, env, tick)
        for row in point:
            row["x"] = batch
        rows += point
        for provider in list(alive):
            error = next(
                (r for r in point if r["provider"] == provider and r["metric"] == "error"), None
            )
            if error is None:
                largest[provider] = batch
            elif error["note"].startswith("OOM"):
                alive.remove(provider)
                failures[provider] = f"first OOM at batch {batch}"
            else:
                alive.remove(provider)
                failures[provider] = error["note"]
    common = dict(env, model=spec.name, mode=cfg.mode, batch_size="", seq_len=spec.seq_len)
    for provider in providers:
        if provider in failures:
            note = failures[provider]
        else:
            note = f"capped at {cap} (no OOM reached)" if cfg.device.type == "cpu" else "no OOM"
        value = float(largest.get(provider, 0))
        rows.append(make_row(common, provider, "max_batch", "samples", (value,) * 3, 1, note))
    return rows


def seq_scaling(
    spec: ModelSpec,
    providers: list[str],
    lengths: list[int],
    cfg: RunConfig,
    env: dict,
    tick: Tick = lambda _: None,
) -> list[dict]:
    """Rows per sequence length (x = seq_len) for a sequence model, interleaved per point."""
    cfg = replace(cfg, mode="scaling-seq")
    rows: list[dict] = []
    for length in lengths:
        longest = spec.kwargs.get("max_len", length)
        if length > longest:
            spec = spec.with_sizes(kwargs={"max_len": length})
        point = measure_point(spec, providers, spec.batch_size, length, cfg, env, tick)
        for row in point:
            row["x"] = length
        rows += point
    return rows


# ---- logical batch ---------------------------------------------------------------------------
def _epoch_runner(spec: ModelSpec, provider: str, logical: int, physical: int, data, device):
    """A callable running one logical step (= one epoch of a dataset of ``logical`` samples)."""
    x, y = data
    model = spec.build().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    dataset = TensorDataset(x, y)
    if provider == "torch":
        loader = DataLoader(dataset, batch_size=physical)
        micro = -(-logical // physical)

        def run() -> None:  # gradient accumulation over the same micro-batches
            for xb, yb in loader:
                (model_loss(spec, model(xb.to(device)), yb.to(device)) / micro).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run
    import fastdp

    model, optimizer, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(dataset, batch_size=logical),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        clipping=provider.removeprefix("fastdp-"),
        poisson_sampling=False,
        max_physical_batch_size=physical,
        seed=0,
    )

    def run() -> None:
        for xb, yb in loader:
            model_loss(spec, model(xb.to(device)), yb.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not optimizer.last_step_updated:
            raise RuntimeError("the logical batch did not close with an update")

    return run


def logical_scaling(
    spec: ModelSpec,
    providers: list[str],
    logical_sizes: list[int],
    physical: int,
    cfg: RunConfig,
    env: dict,
    tick: Tick = lambda _: None,
) -> list[dict]:
    """Rows per logical batch (x = logical batch, batch_size = physical batch)."""
    device = cfg.device
    rows: list[dict] = []
    for logical in logical_sizes:
        common = dict(env, model=spec.name, mode="logical", batch_size=physical, seq_len=0)
        common["x"] = logical
        data = spec.batch(logical, spec.seq_len, torch.device("cpu"))
        runs, memory, errors = {}, {}, {}
        for provider in providers:
            probe = MemoryProbe(device)
            probe.start()
            try:
                run = _epoch_runner(spec, provider, logical, physical, data, device)
                run()  # warm-up: allocates accumulators and optimizer state
            except Exception as err:
                errors[provider] = ("OOM: " if is_oom(err) else "") + f"{type(err).__name__}: {err}"
                continue
            memory[provider] = probe.stop()
            runs[provider] = run
            tick(f"logical {logical} {provider} built")
        times: dict[str, list[float]] = {p: [] for p in runs}
        for r in range(cfg.repeats):
            order = list(runs)
            order = order[r % len(order) :] + order[: r % len(order)] if order else order
            for provider in order:
                times[provider].append(time_block(runs[provider], 1, device))
                tick(f"logical {logical} {provider}")
        runs.clear()
        gc.collect()
        base = times.get("torch", [])
        for provider in providers:
            if provider in errors:
                nan3 = (float("nan"),) * 3
                note = errors[provider][:200]
                rows.append(make_row(common, provider, "error", "", nan3, 0, note))
                continue
            t, n = times[provider], len(times[provider])
            rows.append(make_row(common, provider, "step_time", "s", quantiles(t), n, ""))
            rate = quantiles(logical / v for v in t)
            rows.append(make_row(common, provider, "samples_per_s", "samples/s", rate, n, ""))
            if base:
                ratio = quantiles(a / b for a, b in zip(t, base))
                rows.append(make_row(common, provider, "ratio_time", "x", ratio, n, ""))
            mem = (memory[provider] / MIB,) * 3
            rows.append(make_row(common, provider, "peak_mem", "MiB", mem, 1, ""))
            if "torch" in memory and memory["torch"] > 0:
                mem_ratio = (memory[provider] / memory["torch"],) * 3
                rows.append(make_row(common, provider, "ratio_mem", "x", mem_ratio, 1, ""))
    return rows
