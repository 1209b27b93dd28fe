"""Generate the README's performance section from the committed CSVs, never by hand.

    python -m fastdp.bench.report [bench/results]     (or: fastdp bench report)

writes ``bench/results/README.md``: per CSV its device, commit, command and tables, the
issue's targets checked against the numbers (met / MISSED), and the PNG drawn from it.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

from fastdp.bench.table import lookup, normalise, points, read_csv

CPU_TARGETS = {"mlp": 1.3, "cnn": 1.6, "gpt": 1.6, "conv1d": 1.6}
NOISY_TARGET = 1.1
GPU_MLP_TARGET, GPU_FLOOR_SLACK, GPU_MEM_TARGET = 1.10, 1.10, 1.10


def _f(value, fmt: str = ".2f") -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else format(value, fmt)


def _spread(row: dict | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    if row is None:
        return "-"
    mid = _f(row["median"] * scale, fmt)
    return f"{mid} ({_f(row['p20'] * scale, fmt)}–{_f(row['p80'] * scale, fmt)})"


def _models_section(rows: list[dict]) -> list[str]:
    by_key = lookup(rows)
    out = [
        "| model | provider | step ms (p20–p80) | samples/s | × torch (p20–p80) "
        "| FLOP floor | peak MiB | memory × torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in points(rows):
        providers = list(
            dict.fromkeys(
                r["provider"]
                for r in rows
                if (r["model"], str(r["batch_size"]), str(r["seq_len"]), str(r["x"])) == point
                and r["metric"] in ("step_time", "error")
            )
        )
        model, batch, seq, _ = point
        label = f"{model} B={batch}" + (f" T={seq}" if seq not in ("", "0") else "")
        floor = by_key.get((*point, "floor", "flop_floor"))
        for provider in providers:

            def get(metric, provider=provider, point=point):
                return by_key.get((*point, provider, metric))

            if get("error"):
                note = get("error")["note"].replace("|", "/")[:120]
                out.append(f"| {label} | {provider} | failed: {note} | | | | | |")
                continue
            fl = _f(floor["median"]) if floor and provider == "fastdp-flat" else ""
            out.append(
                f"| {label} | {provider} | {_spread(get('step_time'), '.1f', 1e3)} "
                f"| {_f((get('samples_per_s') or {}).get('median'), '.0f')} "
                f"| {_spread(get('ratio_time'))} | {fl} "
                f"| {_f((get('peak_mem') or {}).get('median'), '.0f')} "
                f"| {_f((get('ratio_mem') or {}).get('median'))} |"
            )
    return out


def fallback_section(rows: list[dict]) -> list[str]:
    """The torch.func fallback's time inside the fastdp-flat step per model (empty when the
    CSV has no fallback rows)."""
    rows = [normalise(r) for r in rows]
    by_key = lookup(rows)
    out = []
    for point in points(rows):
        time_row = by_key.get((*point, "fastdp-flat", "fallback_time"))
        share_row = by_key.get((*point, "fastdp-flat", "fallback_share"))
        error = by_key.get((*point, "fastdp-flat", "fallback_error"))
        if error:
            out.append(f"| {point[0]} | failed: {error['note'][:120]} | | |")
        elif time_row and share_row:
            note = time_row["note"].removeprefix("on the fallback: ").replace("|", "/")
            out.append(
                f"| {point[0]} | {note} | {_f(time_row['median'] * 1e3, '.1f')} "
                f"| {_f(share_row['median'] * 100, '.1f')}% |"
            )
    if not out:
        return []
    head = [
        "Fallback cost: time of the torch.func fallback's `norm_sq` + `accumulate` per "
        "fastdp-flat step, and its share of that step (fastdp warns at make_private which "
        "modules go there):",
        "",
        "| model | modules on the fallback | ms per step | share of step |",
        "|---|---|---|---|",
    ]
    return head + out


def _check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**MISSED**")


def targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, met/MISSED) for the issue's targets on a models CSV."""
    rows = [normalise(r) for r in rows]
    by_key = lookup(rows)
    gpu = any("cpu" not in r["device"].lower() for r in rows[:1])
    out = []
    for point in points(rows):
        model = point[0]

        def med(provider: str, metric: str, point=point) -> float:
            row = by_key.get((*point, provider, metric))
            return row["median"] if row else float("nan")

        flat, none = med("fastdp-flat", "ratio_time"), med("fastdp-none", "ratio_time")
        floor = med("floor", "flop_floor")
        if gpu:
            if model == "mlp":
                out.append((f"{model}: flat ≤ {GPU_MLP_TARGET}× torch", _f(flat), flat <= 1.1))
            if model == "gpt":
                goal = GPU_FLOOR_SLACK * floor
                out.append((f"{model}: flat ≤ 1.1 × floor ({_f(goal)}×)", _f(flat), flat <= goal))
            mem = med("fastdp-flat", "ratio_mem")
            out.append((f"{model}: flat memory ≤ {GPU_MEM_TARGET}× torch", _f(mem), mem <= 1.1))
        elif model in CPU_TARGETS:
            goal = CPU_TARGETS[model]
            out.append((f"{model}: DP-SGD flat ≤ {goal}× torch", _f(flat), flat <= goal))
        out.append((f"{model}: Noisy-SGD ≤ {NOISY_TARGET}× torch", _f(none), none <= NOISY_TARGET))
        target = f"{model}: fastdp-flat faster than opacus-hooks"
        hooks_error = by_key.get((*point, "opacus-hooks", "error"))
        paired = by_key.get((*point, "fastdp-flat", "ratio_opacus_hooks"))
        hooks = med("opacus-hooks", "ratio_time")
        flat_ms, hooks_ms = med("fastdp-flat", "step_time"), med("opacus-hooks", "step_time")
        versus = (
            f"{_f(flat)}× vs {_f(hooks)}× torch "
            f"({_f(flat_ms * 1e3, '.1f')} vs {_f(hooks_ms * 1e3, '.1f')} ms)"
        )
        if hooks_error and math.isnan(hooks):
            note = hooks_error["note"].replace("|", "/")[:90]
            out.append((target, f"opacus-hooks does not run: {note}", "unsupported"))
        elif paired:  # flat / hooks formed round by round: drift cancels
            ok = paired["median"] < 1
            measured = f"flat/hooks {_spread(paired)} per round; {versus}"
            spread = paired["p20"] < 1 <= paired["p80"] if ok else paired["p20"] < 1
            status = _check(ok) + (" (p20–p80 crosses 1)" if spread else "")
            out.append((target, measured, status))
        else:  # older CSVs: through the round-by-round ratios to torch
            ok = None if math.isnan(hooks) else flat < hooks
            out.append((target, versus, ok))
    return [
        (t, m, ok if isinstance(ok, str) else _check(None if m.startswith("-") else ok))
        for t, m, ok in out
    ]


def _sweep_section(rows: list[dict], metrics: tuple[str, ...]) -> list[str]:
    """One table per (model, mode): x down, provider x metric across."""
    out = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["metric"] in metrics:
            groups[(r["model"], r["mode"])].append(r)
    for (model, mode), sel in groups.items():
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        cells = {(str(r["x"]), r["provider"], r["metric"]): r for r in sel}
        xs = sorted({str(r["x"]) for r in sel}, key=lambda v: float(v) if _f(v) != "-" else 0)
        axis = {"scaling-seq": "seq_len", "logical": "logical batch"}.get(mode, "batch")
        head = [f"{p} {m}" for p in providers for m in metrics]
        out += [f"**{model}** ({mode})", "", f"| {axis} | " + " | ".join(head) + " |"]
        out.append("|---" * (len(head) + 1) + "|")
        for x in xs:
            vals = []
            for p in providers:
                for m in metrics:
                    row = cells.get((x, p, m))
                    scale, fmt = (1e3, ".1f") if m == "step_time" else (1.0, ".3g")
                    vals.append(_f(row["median"] * scale, fmt) if row else "-")
            out.append(f"| {x} | " + " | ".join(vals) + " |")
        out.append("")
    max_rows = [r for r in rows if r["metric"] == "max_batch"]
    if max_rows:
        out += ["| model | provider | max physical batch | note |", "|---|---|---|---|"]
        out += [
            f"| {r['model']} | {r['provider']} | {_f(r['median'], '.0f')} | {r['note']} |"
            for r in max_rows
        ]
        out.append("")
    return out


def _generic_section(rows: list[dict]) -> list[str]:
    out = ["| op | provider | x | metric | median | p20–p80 | unit |", "|---" * 7 + "|"]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['provider']} | {r['x']} | {r['metric']} "
            f"| {_f(r['median'], '.4g')} | {_f(r['p20'], '.4g')}–{_f(r['p80'], '.4g')} "
            f"| {r['unit']} |"
        )
    return out


def render(results: Path) -> str:
    """The markdown of every CSV in ``results`` (sorted by name)."""
    lines = [
        "# Performance",
        "",
        "Generated by `fastdp bench report` from the CSVs in this folder; do not edit by hand.",
        "Step time: median over interleaved repeats after warm-up, p20–p80 in brackets; "
        "`× torch` is formed repeat by repeat against the non-private step of the same run. "
        "Peak memory: CUDA max allocated (GPU) or the process's peak RSS delta (CPU). "
        "FLOP floor: (non-private + cheaper per-layer norm FLOPs) / non-private.",
        "",
        "File names carry the device: `cpu<N>t` is a CPU run with N torch threads (`--threads`); "
        "`-quick` marks `--quick` sizes. A CPU shared with other jobs makes multi-threaded "
        "OpenMP timings erratic, so CPU runs here pin one thread; ratios are formed within "
        "one run either way. The CPU targets are the issue's; GPU targets need a GPU run.",
        "",
    ]
    for path in sorted(Path(results).glob("*.csv")):
        rows = read_csv(path)
        if not rows:
            continue
        if path.name.startswith("compile-"):
            from fastdp.bench.compile_report import markdown

            lines += [f"## {path.name}", "", *markdown(rows), ""]
            continue
        first = rows[0]
        lines += [
            f"## {path.name}",
            "",
            f"Device: {first['device']} · torch {first['torch']} · triton {first['triton']} · "
            f"opacus {first.get('opacus', '')} · commit `{first['commit']}` · {first['timestamp']}",
            "",
            f"Reproduce: `{first['command']}`" if first.get("command") else "",
            "",
        ]
        modes = {r["mode"] for r in rows}
        if modes == {"models"}:
            lines += _models_section(rows) + ["", "Targets:", ""]
            lines += ["| target | measured | status |", "|---|---|---|"]
            lines += [f"| {t} | {m} | {s} |" for t, m, s in targets(rows)]
            fallback = fallback_section(rows)
            lines += ["", *fallback] if fallback else []
        elif modes == {"host"}:
            from fastdp.bench.host import markdown

            lines += markdown(rows)
        elif modes & {"scaling-batch", "scaling-seq"}:
            lines += _sweep_section(rows, ("step_time", "ratio_time", "peak_mem"))
        elif modes == {"logical"}:
            lines += _sweep_section(rows, ("samples_per_s", "peak_mem", "ratio_time"))
        else:
            lines += _generic_section(rows)
        png = path.with_suffix(".png")
        if png.exists():
            lines += ["", f"![{path.stem}]({png.name})"]
        lines.append("")
    return "\n".join(lines)


README_BEGIN = "<!-- performance: generated by `fastdp bench report`, do not edit -->"
README_END = "<!-- end of generated performance section -->"


def summary(results: Path) -> str:
    """The top README's performance section: the targets of every full (non-quick) models
    CSV, with its device and command; the details stay in ``results/README.md``."""
    lines = [README_BEGIN, ""]
    for path in sorted(Path(results).glob("models-*.csv")):
        if path.stem.endswith("-quick"):
            continue
        rows = read_csv(path)
        if not rows:
            continue
        first = rows[0]
        lines += [
            f"`bench/results/{path.name}` — {first['device']}, torch {first['torch']}, "
            f"commit `{first['commit']}`; reproduce: `{first.get('command', '')}`",
            "",
            "| target | measured | status |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {m} | {st} |" for t, m, st in targets(rows)]
        lines.append("")
        fallback = fallback_section(rows)
        lines += [*fallback, ""] if fallback else []
    lines += ["All runs, tables and plots: [bench/results/README.md](bench/results/README.md).", ""]
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme: Path, results: Path) -> bool:
    """Replace the generated block of ``readme`` (between the markers) by ``summary``."""
    if not readme.exists():
        return False
    text = readme.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[:start] + summary(results) + text[end + len(README_END) :])
    return True


def write_report(results: Path, out: Path | None = None) -> Path:
    """Write ``render(results)`` to ``out`` (default ``results/README.md``) and refresh the
    generated performance block of the project README next to ``results``' parent."""
    out = Path(out) if out else Path(results) / "README.md"
    out.write_text(render(results))
    update_readme(Path(results).resolve().parent.parent / "README.md", Path(results))
    return out


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")))
