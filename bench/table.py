"""The long CSV format of every benchmark and its terminal table.

One row per measurement. Fixed columns come first, in ``COLUMNS`` order; rows from the
kernel micro-benchmarks may carry more keys (GB/s, peak fractions), which are appended as
extra columns rather than dropped.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

COLUMNS = (
    "model",
    "provider",
    "mode",
    "batch_size",
    "seq_len",
    "x",
    "metric",
    "unit",
    "median",
    "p20",
    "p80",
    "n",
    "device",
    "torch",
    "triton",
    "opacus",
    "commit",
    "timestamp",
    "command",
    "note",
)
NUMERIC = ("median", "p20", "p80")


def normalise(row: dict) -> dict:
    """Fill the fixed columns (kernel rows name their op ``op`` rather than ``model``)."""
    row = dict(row)
    if not row.get("model") and row.get("op"):
        row["model"] = row["op"]
    for column in COLUMNS:
        row.setdefault(column, "")
    return row


def write_csv(rows: list[dict], path: Path) -> Path:
    """Write ``rows`` as a long CSV (parent folders created); returns the path."""
    rows = [normalise(r) for r in rows]
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS) + extra, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
    return path


def _fmt(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def read_csv(path: Path) -> list[dict]:
    """Rows of a long CSV with median/p20/p80 as floats (NaN where empty)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            try:
                row[key] = float(row.get(key) or "nan")
            except ValueError:
                row[key] = float("nan")
    return rows


def lookup(rows: list[dict]) -> dict[tuple, dict]:
    """{(model, batch_size, seq_len, x, provider, metric): row} for quick access."""
    return {(*_point(r), r["provider"], r["metric"]): r for r in rows}


def _point(r: dict) -> tuple[str, str, str, str]:
    return (r["model"], str(r["batch_size"]), str(r["seq_len"]), str(r["x"]))


def points(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """The distinct (model, batch_size, seq_len, x) of ``rows`` in first-seen order."""
    seen: dict[tuple, None] = {}
    for r in rows:
        seen.setdefault((r["model"], str(r["batch_size"]), str(r["seq_len"]), str(r["x"])), None)
    return list(seen)


def _num(value, fmt: str) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    """A readable table per measurement point: time, throughput, memory and ratios, with the
    FLOP floor of DP-SGD beside the measured flat ratio."""
    rows = [normalise(r) for r in rows]
    by_key = lookup(rows)
    providers: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        key = (r["model"], str(r["batch_size"]), str(r["seq_len"]), str(r["x"]))
        if r["provider"] not in providers[key] and r["provider"] != "floor":
            if r["metric"] in ("step_time", "error"):
                providers[key].append(r["provider"])
    out = []
    header = (
        f"  {'provider':<18}{'step ms':>10}{'p20-p80 ms':>16}{'samples/s':>11}"
        f"{'x torch':>9}{'p20-p80':>13}{'peak MiB':>10}{'mem x':>7}"
    )
    for point in points(rows):
        if not providers[point]:
            continue
        model, batch, seq, x = point

        def get(provider: str, metric: str, point=point) -> dict | None:
            return by_key.get((*point, provider, metric))

        title = f"{model}  B={batch}" + (f"  T={seq}" if seq not in ("", "0") else "")
        title += f"  x={x}" if x not in ("", "0") else ""
        floor = get("floor", "flop_floor")
        flops = get("torch", "gflop_per_step")
        if floor:
            title += f"  | FLOP floor {_num(floor['median'], '.3f')}x"
            if flops:
                title += f" ({_num(flops['median'], '.3g')} GFLOP/step)"
        out += [title, header]
        for provider in providers[point]:
            error = get(provider, "error")
            if error:
                out.append(f"  {provider:<18}  failed: {error['note'][:90]}")
                continue
            t, s = get(provider, "step_time"), get(provider, "samples_per_s")
            ratio, mem = get(provider, "ratio_time"), get(provider, "peak_mem")
            mem_ratio = get(provider, "ratio_mem")
            spread = f"{_num(t['p20'] * 1e3, '.1f')}-{_num(t['p80'] * 1e3, '.1f')}"
            rspread = f"{_num(ratio['p20'], '.2f')}-{_num(ratio['p80'], '.2f')}" if ratio else "-"
            line = (
                f"  {provider:<18}{_num(t['median'] * 1e3, '.1f'):>10}{spread:>16}"
                f"{_num(s['median'], '.0f'):>11}"
                f"{_num(ratio['median'], '.2f') if ratio else '-':>9}{rspread:>13}"
                f"{_num(mem['median'], '.0f') if mem else '-':>10}"
                f"{_num(mem_ratio['median'], '.2f') if mem_ratio else '-':>7}"
            )
            if provider == "fastdp-flat" and floor and ratio:
                line += f"   (floor {_num(floor['median'], '.2f')})"
            out.append(line)
        out.append("")
    return "\n".join(out)
