"""``fastdp bench host``: what a training step costs the host, per provider.

    fastdp bench host [--models gpt2,cnn,mlp] [--modes torch,flat,none,...] [--repeats N]
                      [--out DIR] [--quick] [--threads N] [--no-graph-breaks]

At negligible width (``bench/host_models.py``) the arithmetic is nothing and a step's time is
what the host spends issuing it; on a GPU each aten op is (at least) one kernel launch, and a
host sync drains the stream. Per model and provider (``torch``, ``fastdp-<clipping>``,
``opacus-hooks``, ``opacus-ghost``; a provider that cannot run gets an ``error`` row with
its message), one long CSV row per measurement:

- ``aten_ops``: aten ops of one full training step (forward, loss, backward,
  ``optimizer.step()``, ``zero_grad``; for fastdp with the private loader's micro-batch
  signal), counted by a ``TorchDispatchMode`` over one step after warm-up (every op it sees
  but the profiler's ``record_function`` markers). Deterministic.
- ``host_syncs``: the ops of that step that force a device-to-host read (``SYNC_OPS`` and
  ``is_sync`` below); the note lists them by op. Deterministic.
- ``host_time``: seconds per step, median and p20/p80 over ``repeats`` rounds; every
  round times one block of steps per provider in an order rotated round by round, all in one
  process (as ``bench/harness.py``), without the dispatch mode.
- ``ratio_ops``, ``ratio_time``: to ``torch`` (time formed round by round);
  ``ratio_opacus_hooks``: a fastdp provider's time over Opacus hooks', round by round.
- ``graph_breaks``: ``torch._dynamo.explain`` of the forward of a 4-layer MLP (``mlp4``) and
  of the GPT-2 model, non-private and made private with fastdp flat (eager model).

What counts as a host sync (an op the host must wait on the device for):
- ops returning a Python number read from a tensor: ``_local_scalar_dense`` (what
  ``.item()``, ``float()``, ``int()``, ``bool()`` and ``is_nonzero`` reach), ``equal``,
  ``allclose``; generally any op whose schema returns no tensor, except the metadata ops in
  ``METADATA_OPS``;
- ops whose output size depends on the data: ``nonzero``, ``argwhere``, ``unique`` in every
  form (``_unique``, ``_unique2``, ``unique_dim``, ``unique_consecutive``,
  ``unique_dim_consecutive``), ``masked_select``, ``bincount``, ``repeat_interleave`` with
  tensor repeats and no ``output_size``, and ``index`` / ``index_put`` with a boolean mask;
- copies from a non-CPU device to the CPU (``_to_copy``, ``copy_``): only on a GPU run;
- ``Tensor.tolist()`` and ``Tensor.numpy()``, which on CPU read memory without an aten op
  (on a GPU they need one of the copies above): counted by patching the two methods while
  the step is counted.
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from fastdp.bench.harness import (
    _short,
    device_slug,
    environment,
    make_row,
    quantiles,
    time_block,
)
from fastdp.bench.host_models import DEFAULT_MODELS, HOST_MODELS, HostModel, loss_fn
from fastdp.bench.workloads import LR, MAX_GRAD_NORM, NOISE_MULTIPLIER, PROVIDERS

Step = Callable[[], None]
CPU = torch.device("cpu")
BASELINE = "torch"
ALIASES = {p.split("-", 1)[-1]: p for p in PROVIDERS} | {p: p for p in PROVIDERS}
ALIASES["hooks"], ALIASES["ghost"] = "opacus-hooks", "opacus-ghost"

SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "allclose",
        "nonzero",
        "argwhere",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "masked_select",
        "bincount",
    }
)
# Ops returning a non-tensor that read only metadata, never the data.
METADATA_OPS = frozenset(
    {"is_same_size", "_nnz", "dense_dim", "sparse_dim", "is_coalesced", "size", "stride",
     "numel", "dim", "storage_offset", "sym_size", "sym_stride", "sym_numel",
     "sym_storage_offset", "is_complex", "is_floating_point", "is_contiguous",
     "is_strides_like_format", "is_non_overlapping_and_dense", "_has_same_storage_numel"}
)  # fmt: skip


_NUMBER_TYPES = frozenset(
    {"number", "bool", "int", "float", "complex", "SymInt", "SymFloat", "SymBool", "Scalar"}
)


def _op_name(func) -> str:
    return func._schema.name.split("::", 1)[-1]


def _is_bool_index(indices) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
        for t in (indices or ())
    )


def is_sync(func, args: tuple, kwargs: dict) -> bool:
    """Whether the aten op ``func`` called with ``args``/``kwargs`` makes the host wait for the
    device (see the module docstring)."""
    name = _op_name(func)
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"):
        return _is_bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    if name == "repeat_interleave":  # tensor repeats: the output length is their sum
        overload = func._overloadname
        if overload not in ("Tensor", "self_Tensor"):
            return False
        return kwargs.get("output_size") is None
    if name in ("_to_copy", "copy_"):
        src = args[1] if name == "copy_" and len(args) > 1 else (args[0] if args else None)
        if isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta"):
            dest = args[0] if name == "copy_" else kwargs.get("device")
            dest_dev = dest.device if isinstance(dest, torch.Tensor) else dest
            return dest_dev is not None and torch.device(dest_dev).type == "cpu"
        return False
    returns = func._schema.returns
    if returns and name not in METADATA_OPS:  # a Python number or bool made from the data
        return all(str(r.type) in _NUMBER_TYPES for r in returns)
    return False


def _caller() -> str:
    """``file:line (function)`` of the innermost frame outside torch and this module: the
    line of the model, library or provider that asked for the sync."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("bench/host.py"):
            parts = path.split("/")
            for anchor in ("site-packages", "fastdp", "bench", "kernels"):
                if anchor in parts[:-1]:
                    i = len(parts) - 1 - parts[::-1].index(anchor)
                    parts = parts[i + (anchor == "site-packages") :]
                    break
            else:
                parts = parts[-2:]
            return f"{'/'.join(parts)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class StepCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, and the host syncs among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.by_op: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()  # "op at file:line (function)"
        self._patched: dict[str, Callable] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function markers: no work, no kernel
            return func(*args, **kwargs)
        self.ops += 1
        self.by_op[_op_name(func)] += 1
        if is_sync(func, args, kwargs):
            self._sync(_op_name(func))
        return func(*args, **kwargs)

    def _sync(self, name: str) -> None:
        self.syncs[name] += 1
        self.sites[f"{name} at {_caller()}"] += 1

    def __enter__(self):
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._patched[method] = original

            def counted(tensor, *a, _original=original, _method=method, **kw):
                self._sync(f"Tensor.{_method}")
                return _original(tensor, *a, **kw)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._patched.items():
                setattr(torch.Tensor, method, original)
            self._patched.clear()

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())


@dataclass
class StepCost:
    """The deterministic cost of one step: aten ops and host syncs, by op."""

    ops: int
    syncs: int
    sync_ops: dict[str, int] = field(default_factory=dict)
    top_ops: dict[str, int] = field(default_factory=dict)
    sync_sites: dict[str, int] = field(default_factory=dict)


def count_step(step: Step) -> StepCost:
    """Aten ops and host syncs of one call of ``step`` (warm it up first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with StepCounter() as counter:
            step()
    return StepCost(
        counter.ops,
        counter.sync_count,
        dict(counter.syncs.most_common()),
        dict(counter.by_op.most_common(8)),
        dict(counter.sites.most_common()),
    )


# ---- providers --------------------------------------------------------------------------------
def _loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=x.shape[0])


def build_step(model: HostModel, provider: str, device: torch.device = CPU) -> Step:
    """One training step of ``provider`` on ``model``'s fixed batch; raises if unsupported.

    As ``bench/workloads.py``: SGD, sigma 1, C 1, no Poisson sampling; each fastdp step is a
    whole logical step, announced as the private loader announces it."""
    net = model.build().to(device)
    x, y = model.batch(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    criterion: Callable = loss_fn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if provider == "torch":
            pass
        elif provider.startswith("fastdp-"):
            import fastdp

            net, optimizer, _ = fastdp.PrivacyEngine().make_private(
                module=net, optimizer=optimizer, data_loader=_loader(x, y),
                noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                clipping=provider.removeprefix("fastdp-"), poisson_sampling=False, seed=0,
            )  # fmt: skip
        elif provider in ("opacus-hooks", "opacus-ghost"):
            net, optimizer, criterion = _opacus(provider, net, optimizer, x, y)
        else:
            raise ValueError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    signal = getattr(optimizer, "signal_micro_batch", None)
    signal = signal if provider.startswith("fastdp-") else None
    batch = x.shape[0]

    def step() -> None:
        if signal is not None:
            signal(is_last=True, size=batch)
        loss = criterion(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _opacus(provider: str, net: nn.Module, optimizer, x, y):
    from opacus import PrivacyEngine

    mode = provider.removeprefix("opacus-")
    kwargs = dict(
        module=net, optimizer=optimizer, data_loader=_loader(x, y),
        noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=False, grad_sample_mode=mode,
    )  # fmt: skip
    if mode == "hooks":
        net, optimizer, _ = PrivacyEngine().make_private(**kwargs)
        return net, optimizer, loss_fn
    net, optimizer, criterion, _ = PrivacyEngine().make_private(
        criterion=nn.CrossEntropyLoss(), **kwargs
    )

    def ghost_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.dim() == 3:  # per-sequence privacy unit: opacus needs the (B, T, V) shape
            flat = output.reshape(-1, output.shape[-1])
            return criterion(flat, target.reshape(-1), shape=output.shape)
        return criterion(output, target)

    return net, optimizer, ghost_loss


# ---- graph breaks -----------------------------------------------------------------------------
def graph_breaks(model: HostModel, provider: str) -> tuple[int, list[str]]:
    """(graph breaks, their reasons) of ``torch._dynamo.explain`` over the forward of
    ``model`` as ``provider`` builds it (``torch`` or ``fastdp-<clipping>``), eager."""
    net = model.build()
    x, y = model.batch(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if provider.startswith("fastdp-"):
            import fastdp

            net, optimizer, _ = fastdp.PrivacyEngine().make_private(
                module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR),
                data_loader=_loader(x, y), noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM, clipping=provider.removeprefix("fastdp-"),
                poisson_sampling=False, seed=0,
            )  # fmt: skip
            signal = getattr(optimizer, "signal_micro_batch", None)
            if signal is not None:
                signal(is_last=True, size=x.shape[0])
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(net)(x)
        finally:
            torch._dynamo.reset()
    reasons = [getattr(b, "reason", str(b)) for b in explained.break_reasons]
    return int(explained.graph_break_count), [str(r).splitlines()[0][:120] for r in reasons]


# ---- the run ----------------------------------------------------------------------------------
def _count_note(counts: dict[str, int], limit: int = 6) -> str:
    items = list(counts.items())
    text = ", ".join(f"{name} {n}" for name, n in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def measure_model(
    model: HostModel,
    providers: list[str],
    env: dict,
    repeats: int = 7,
    warmup: int = 3,
    block_s: float = 0.2,
    tick: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """Rows of every provider on ``model``: ops, syncs, time and ratios (module docstring)."""
    device = torch.device("cpu")
    common = dict(
        env, model=model.name, mode="host", batch_size=model.batch_size, seq_len=model.seq_len
    )
    steps: dict[str, Step] = {}
    costs: dict[str, StepCost] = {}
    inner: dict[str, int] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {p: [] for p in providers}
    for provider in providers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = build_step(model, provider, device)
                for _ in range(warmup):
                    step()
            costs[provider] = count_step(step)
            last = time_block(step, 1, device)
        except Exception as err:  # opacus refusing a layer, ...
            errors[provider] = _short(err)
            gc.collect()
            tick(f"{model.name}/{provider} failed")
            continue
        steps[provider] = step
        inner[provider] = max(1, round(block_s / max(last, 1e-9)))
        tick(f"{model.name}/{provider} built")
    for r in range(repeats):
        shift = r % len(providers)
        for provider in providers[shift:] + providers[:shift]:
            if provider in steps:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        times[provider].append(time_block(steps[provider], inner[provider], device))
                except Exception as err:
                    errors[provider] = _short(err)
                    del steps[provider]
            tick(f"{model.name}/{provider}")
    steps.clear()
    gc.collect()

    rows: list[dict] = []
    base_cost, base_times = costs.get(BASELINE), times.get(BASELINE, [])
    hooks = times.get("opacus-hooks", [])
    for provider in providers:
        note = errors.get(provider, "")
        if provider not in costs:
            nan3 = (float("nan"),) * 3
            rows.append(make_row(common, provider, "error", "", nan3, 0, note))
            continue
        cost = costs[provider]
        ops3, syncs3 = (float(cost.ops),) * 3, (float(cost.syncs),) * 3
        rows.append(
            make_row(
                common,
                provider,
                "aten_ops",
                "ops/step",
                ops3,
                1,
                "top: " + _count_note(cost.top_ops, 4),
            )
        )
        sync_note = _count_note(cost.sync_ops)
        if cost.sync_sites:
            sync_note += "; sites: " + _count_note(cost.sync_sites, 4)
        rows.append(make_row(common, provider, "host_syncs", "syncs/step", syncs3, 1,
                             sync_note))  # fmt: skip
        if base_cost is not None and base_cost.ops:
            rows.append(make_row(common, provider, "ratio_ops", "x",
                                 (cost.ops / base_cost.ops,) * 3, 1, ""))  # fmt: skip
        t = times[provider]
        if t:
            rows.append(make_row(common, provider, "host_time", "s", quantiles(t), len(t), note))
        if t and base_times and len(base_times) == len(t):
            ratios = [a / b for a, b in zip(t, base_times)]
            rows.append(make_row(common, provider, "ratio_time", "x", quantiles(ratios), len(t),
                                 note))  # fmt: skip
        if provider.startswith("fastdp-") and t and hooks and len(hooks) == len(t):
            paired = quantiles(a / b for a, b in zip(t, hooks))
            rows.append(make_row(common, provider, "ratio_opacus_hooks", "x", paired, len(t),
                                 note))  # fmt: skip
    return rows


def measure_graph_breaks(names: list[str], env: dict, provider: str = "fastdp-flat") -> list[dict]:
    """``graph_breaks`` rows: each model in ``names``, non-private and with ``provider``."""
    rows = []
    for name in names:
        model = HOST_MODELS[name]
        common = dict(
            env, model=name, mode="host", batch_size=model.batch_size, seq_len=model.seq_len
        )
        for who in ("torch", provider):
            try:
                count, reasons = graph_breaks(model, who)
            except Exception as err:
                nan3 = (float("nan"),) * 3
                rows.append(make_row(common, who, "graph_breaks_error", "", nan3, 0, _short(err)))
                continue
            firsts = Counter(reasons).most_common(3)
            note = "; ".join(f"{n}x {reason}" for reason, n in firsts)
            rows.append(make_row(common, who, "graph_breaks", "breaks", (float(count),) * 3, 1,
                                 note))  # fmt: skip
    return rows


# ---- output -----------------------------------------------------------------------------------
def _num(value, fmt: str) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if value != value else format(value, fmt)


def table_rows(rows: list[dict]) -> list[tuple[str, str, dict]]:
    """(model, provider, {metric: row}) in first-seen order."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        out.setdefault((r["model"], r["provider"]), {})[r["metric"]] = r
    return [(m, p, metrics) for (m, p), metrics in out.items()]


def format_table(rows: list[dict]) -> str:
    """The terminal table: per model and provider, ops, syncs, host ms, ratios to torch."""
    head = (
        f"  {'provider':<18}{'aten ops':>9}{'x torch':>8}{'syncs':>7}"
        f"{'host ms':>9}{'p20-p80':>14}{'x torch':>8}"
    )
    out, current = [], None
    for model, provider, m in table_rows(rows):
        if "graph_breaks" in m or "graph_breaks_error" in m:
            continue
        if model != current:
            out += ["", model, head]
            current = model
        if "error" in m:
            out.append(f"  {provider:<18}failed: {m['error']['note'][:100]}")
            continue
        t = m.get("host_time")
        spread = f"{_num(t['p20'] * 1e3, '.2f')}-{_num(t['p80'] * 1e3, '.2f')}" if t else "-"
        out.append(
            f"  {provider:<18}{_num(m['aten_ops']['median'], '.0f'):>9}"
            f"{_num((m.get('ratio_ops') or {}).get('median'), '.2f'):>8}"
            f"{_num(m['host_syncs']['median'], '.0f'):>7}"
            f"{_num(t['median'] * 1e3, '.2f') if t else '-':>9}{spread:>14}"
            f"{_num((m.get('ratio_time') or {}).get('median'), '.2f'):>8}"
        )
    breaks = [r for r in rows if r["metric"] in ("graph_breaks", "graph_breaks_error")]
    if breaks:
        out += ["", "graph breaks (torch._dynamo.explain of the forward, eager model)"]
        for r in breaks:
            value = _num(r["median"], ".0f") if r["metric"] == "graph_breaks" else "failed"
            out.append(f"  {r['model']:<8}{r['provider']:<14}{value:>5}  {r['note'][:90]}")
    return "\n".join(out).lstrip("\n")


def markdown(rows: list[dict]) -> list[str]:
    """The report's section of a host CSV (``bench/report.py``)."""
    out = [
        "| model | provider | aten ops/step | × torch | host syncs/step | host ms (p20–p80) "
        "| × torch (p20–p80) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, provider, m in table_rows(rows):
        if "error" in m:
            note = m["error"]["note"].replace("|", "/")[:120]
            out.append(f"| {model} | {provider} | failed: {note} | | | | |")
            continue
        if "aten_ops" not in m:
            continue
        t, rt = m.get("host_time"), m.get("ratio_time")
        ms = (
            f"{_num(t['median'] * 1e3, '.2f')} ({_num(t['p20'] * 1e3, '.2f')}–"
            f"{_num(t['p80'] * 1e3, '.2f')})"
            if t
            else "-"
        )
        ratio = (
            f"{_num(rt['median'], '.2f')} ({_num(rt['p20'], '.2f')}–{_num(rt['p80'], '.2f')})"
            if rt
            else "-"
        )
        out.append(
            f"| {model} | {provider} | {_num(m['aten_ops']['median'], '.0f')} "
            f"| {_num((m.get('ratio_ops') or {}).get('median'), '.2f')} "
            f"| {_num(m['host_syncs']['median'], '.0f')} | {ms} | {ratio} |"
        )
    breaks = [r for r in rows if r["metric"] == "graph_breaks"]
    if breaks:
        out += [
            "",
            "| model | provider | graph breaks (dynamo explain, forward) |",
            "|---|---|---|",
        ]
        out += [f"| {r['model']} | {r['provider']} | {_num(r['median'], '.0f')} |" for r in breaks]
    return out


def figure(rows: list[dict]):
    """Per model: aten ops / torch, host syncs per step (torch has none, so not a ratio) and
    host time / torch (p20-p80 whiskers), one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows if r["metric"] == "aten_ops"))
    panels = (("ratio_ops", "aten ops / torch"), ("host_syncs", "host syncs per step"),
              ("ratio_time", "host time / torch"))  # fmt: skip
    ncols = max(1, len(models))
    fig, axes = plt.subplots(3, ncols, figsize=(4.2 * ncols, 10), squeeze=False)
    for j, model in enumerate(models):
        for i, (metric, title) in enumerate(panels):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == model and r["metric"] == metric]
            sel = [r for r in sel if r["median"] == r["median"]]
            values = [r["median"] for r in sel]
            low = [max(r["median"] - r["p20"], 0) for r in sel]
            high = [max(r["p80"] - r["median"], 0) for r in sel]
            ax.bar(range(len(sel)), values, yerr=[low, high], color="tab:blue", capsize=3)
            for k, v in enumerate(values):
                ax.text(k, v, _num(v, ".0f" if metric == "host_syncs" else ".2f"),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
            if metric != "host_syncs":
                ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(range(len(sel)), [r["provider"] for r in sel], rotation=60,
                          ha="right", fontsize=8)  # fmt: skip
            ax.set_title(f"{model}: {title}", fontsize=10)
    return fig


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdp bench host", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS),
        help=f"comma list of {','.join(m for m in HOST_MODELS if m != 'mlp4')}",
    )  # fmt: skip
    parser.add_argument(
        "--modes", "--providers", dest="modes", default=",".join(PROVIDERS),
        help="comma list of providers: torch, flat, per_layer, automatic, none, hooks, ghost "
        "(or their full names, fastdp-flat, opacus-hooks, ...)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, help="interleaved timing rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before counting and timing")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="3 rounds of short blocks")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--tag", help="name part of the CSV: host-<tag>-<device>.csv")
    parser.add_argument("--no-graph-breaks", action="store_true", help="skip dynamo explain")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _providers(text: str) -> list[str]:
    out = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if name not in ALIASES:
            raise SystemExit(f"unknown provider {name!r}; use {', '.join(sorted(ALIASES))}")
        out.append(ALIASES[name])
    if BASELINE not in out:  # every ratio is to torch
        out.insert(0, BASELINE)
    return list(dict.fromkeys(out))


def main(argv: list[str]) -> int:
    """Entry point of ``fastdp bench host``."""
    from tqdm import tqdm

    from fastdp.bench.table import write_csv

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    providers = _providers(args.modes)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in HOST_MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; use {', '.join(HOST_MODELS)}")
    models = []
    for name in names:
        reason = HOST_MODELS[name].unavailable()
        if reason:
            print(f"fastdp bench host: skipping {name} ({reason})")
        else:
            models.append(HOST_MODELS[name])
    repeats = args.repeats or (3 if args.quick else 7)
    block_s = 0.05 if args.quick else 0.25
    device = torch.device("cpu")
    env = environment(device, " ".join(["fastdp", "bench", "host", *argv]))
    units = len(models) * len(providers) * (1 + repeats)
    bar = tqdm(total=units, desc="host", disable=args.no_progress, leave=False, file=sys.stderr)

    def tick(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    rows: list[dict] = []
    with bar:
        for model in models:
            rows += measure_model(model, providers, env, repeats, args.warmup, block_s, tick)
    if not args.no_graph_breaks:
        flat = "fastdp-flat"
        chosen = ["mlp4"] + (["gpt2"] if any(m.name == "gpt2" for m in models) else [])
        rows += measure_graph_breaks(chosen, env, flat)
    suffix = (f"{args.tag}-" if args.tag else "") + device_slug(device)
    suffix += "-quick" if args.quick else ""
    path = write_csv(rows, args.out / f"host-{suffix}.csv")
    print(format_table(rows))
    print(f"wrote {path}")
    if not args.no_plot:
        from fastdp.bench.plot import plot_csv

        print(f"wrote {plot_csv(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
