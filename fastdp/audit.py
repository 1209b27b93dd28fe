"""Built-in privacy audit: ``sensitivity_check``, ``empirical_epsilon`` and ``fastdp audit``.

Two checks that treat fastdp as a black box, through its public API only:

- ``sensitivity_check(model, loss_fn, batch)`` (fastdp/audit_sensitivity.py): deterministic,
  no noise. Appends crafted canaries (huge inputs, a ghost-norm-cancelling sample, NaN/Inf,
  repeated tokens, a zero sample) to the user's own batch and measures how far each moves
  the clipped sum, in units of C (must stay <= 1 + 1e-3), and compares the clipped sum with
  a float64 single-sample oracle.
- ``empirical_epsilon()`` (fastdp/audit_epsilon.py): the canary-in / canary-out statistical
  audit of one DP-SGD step (Nasr et al. 2021; Steinke, Nasr, Jagielski 2023): a 95%
  Clopper-Pearson lower bound on epsilon, which must not exceed the accountant's epsilon,
  and a positive control (clipping off) that it must detect.

``fastdp audit [--quick] [--trials N] [--out DIR]`` runs both (the sensitivity check on a
few built-in models) and exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from fastdp.audit_epsilon import (
    SETTINGS,
    AuditSetting,
    EpsilonAudit,
    SettingResult,
    clopper_pearson,
    empirical_epsilon,
    epsilon_from_rates,
    evaluate_threshold,
    ideal_eps_lb,
)
from fastdp.audit_sensitivity import (
    CANARIES,
    CanaryResult,
    SensitivityError,
    SensitivityReport,
    sensitivity_check,
)

__all__ = [
    "CANARIES",
    "SETTINGS",
    "AuditSetting",
    "CanaryResult",
    "EpsilonAudit",
    "SensitivityError",
    "SensitivityReport",
    "SettingResult",
    "clopper_pearson",
    "empirical_epsilon",
    "epsilon_from_rates",
    "evaluate_threshold",
    "ideal_eps_lb",
    "sensitivity_check",
]

QUICK_TRIALS = 4000  # per setting; the control needs >= ~1300 for eps_lb > 4.39 at sigma = 1
FULL_TRIALS = 20000


def _sensitivity_models():
    """(name, model, loss_fn, batch) for the CLI's sensitivity check: a Linear on (B, T, d)
    (the ghost norm is the cheaper method there), an MLP classifier, a small GPT."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fastdp.models import GPT, mlp

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def squared_error(output, target):
        return (output - target).square().sum()

    def cross_entropy(output, target):
        return F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction="sum")

    x_seq = torch.randn(16, 4, 16, generator=generator)
    yield "linear-seq", nn.Linear(16, 16), squared_error, (x_seq, torch.randn(16, 4, 16))
    x = torch.randn(16, 40, generator=generator)
    y = torch.randint(0, 10, (16,), generator=generator)
    yield "mlp", mlp(in_features=40, hidden=64), cross_entropy, (x, y)
    tokens = torch.randint(0, 64, (8, 12), generator=generator)
    gpt = GPT(vocab=64, dim=32, depth=1, heads=2, max_len=16)
    yield "gpt", gpt, cross_entropy, (tokens, tokens.roll(-1, 1))


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict = {"config": config}
    start = time.perf_counter()
    reports = {}
    if not args.skip_sensitivity:
        for name, model, loss_fn, batch in tqdm(
            list(_sensitivity_models()), desc="fastdp audit: sensitivity", unit="model"
        ):
            reports[name] = sensitivity_check(model, loss_fn, batch)
    results["sensitivity"] = {name: r.to_dict() for name, r in reports.items()}
    total = args.trials // 2 * 2 * len(SETTINGS)
    with tqdm(total=total, desc="fastdp audit: canary runs", unit="run") as bar:
        audit = empirical_epsilon(
            trials=args.trials,
            noise_multiplier=args.noise_multiplier,
            delta=args.delta,
            seed=args.seed,
            progress=bar.update,
        )
    results["empirical_epsilon"] = audit.rows()
    results["ok"] = audit.ok and all(r.ok for r in reports.values())
    results["seconds"] = time.perf_counter() - start
    return results | {"_reports": reports, "_audit": audit}


def _write(out: Path, results: dict, audit: EpsilonAudit) -> None:
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    (out / "audit.json").write_text(json.dumps(public, indent=2))
    rows = audit.rows()
    with open(out / "empirical_epsilon.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "sensitivity.csv", "w", newline="") as f:
        fields = ["model", "clipping", "max_grad_norm", "oracle_max_rel_diff"]
        fields += list(CanaryResult.__dataclass_fields__)
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for model, report in public["sensitivity"].items():
            head = {k: report[k] for k in fields[1:4]}
            for canary in report["canaries"]:
                writer.writerow({"model": model, **head, **canary})
    plot(audit, out / "empirical_epsilon.png")


def plot(audit: EpsilonAudit, path: Path) -> None:
    """eps claimed, eps_lb with its 95% interval and the ideal eps_lb, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, r in enumerate(audit.results):
        hi = min(r.eps_hi, 2 * max(r.eps_claimed, r.eps_lb) + 1)
        ax.errorbar(i, r.eps_lb, yerr=[[0], [hi - r.eps_lb]], fmt="o", color="C0", capsize=4)
        ax.plot(i, r.eps_claimed, "_", color="C3", markersize=30)
        ax.plot(i, r.ideal_eps_lb, "x", color="C2")
        ax.annotate(r.verdict, (i, r.eps_lb), textcoords="offset points", xytext=(8, -4))
    ax.plot([], [], "o", color="C0", label="eps_lb (95% CI)")
    ax.plot([], [], "_", color="C3", markersize=12, label="eps claimed")
    ax.plot([], [], "x", color="C2", label="ideal eps_lb")
    ax.set_xticks(range(len(audit.results)), [r.setting for r in audit.results])
    ax.set_ylabel("epsilon")
    ax.set_title(f"canary audit, {audit.results[0].trials} runs per setting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastdp audit", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRIALS} runs per setting")
    parser.add_argument("--trials", type=int, default=None, help=f"default {FULL_TRIALS}")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0, help="data and canary (noise: OS)")
    parser.add_argument("--skip-sensitivity", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write CSV/JSON/PNG here")
    args = parser.parse_args(argv)
    if args.trials is None:
        args.trials = QUICK_TRIALS if args.quick else FULL_TRIALS
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    results = run(args)
    for name, report in results["_reports"].items():
        print(f"[{name}] {report.table()}")
    audit = results["_audit"]
    r0 = audit.results[0]
    print(
        f"\nempirical epsilon: one DP-SGD step, sigma={r0.noise_multiplier:g}, C=1, "
        f"delta={r0.delta:g}; {r0.trials} runs per setting (half with the canary, half of "
        "each held out to pick the threshold); 95% Clopper-Pearson bounds"
    )
    print(audit.table())
    verdict = "all checks passed" if results["ok"] else "AUDIT FAILED"
    print(f"\n{verdict} in {results['seconds']:.0f} s")
    if args.out:
        _write(args.out, results, audit)
    return 0 if results["ok"] else 1
