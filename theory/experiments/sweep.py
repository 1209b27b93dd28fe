"""Run a whole batch-size sweep: plan, skip finished runs, train, write CSVs, plots, report."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastdp.theory.experiments.data import ArrayDataset, load_dataset, model_factory
from fastdp.theory.experiments.diagnostics import gradient_noise, noise_ratios
from fastdp.theory.experiments.plots import plot_dir
from fastdp.theory.experiments.protocol import KEY_COLUMNS, SweepConfig
from fastdp.theory.experiments.results import (
    RESULTS_FILE,
    append_result,
    finished_keys,
    read_rows,
    remedy_report,
    report,
)
from fastdp.theory.experiments.train import train_run


def run_sweep(
    config: SweepConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
) -> list[dict[str, str]]:
    """Train every run of ``config`` not yet in ``out_dir``/results.csv; return the sweep's
    rows (finished earlier or now) and write ``report.md`` (and the plots) next to them."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    model_name, build_model = model_factory(config.dataset, config.model)
    config = config.replace(model=model_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**dataclasses.asdict(config), **_provenance()}
    (out / "config.json").write_text(json.dumps(settings, indent=2) + "\n")

    runs = config.runs()
    done = finished_keys(out)
    todo = [r for r in runs if r.key() not in done]
    print(
        f"batch-sweep: {len(runs)} runs ({len(runs) - len(todo)} already in {out / RESULTS_FILE}),"
        f" B = {sorted(config.batch_sizes)}, S = {config.steps}, sigma/B = {config.noise_ratio:g}"
    )
    if todo or not _noise_known(out, config):
        train, test = load_dataset(
            config.dataset,
            num_samples=config.num_samples,
            data_seed=config.data_seed,
            data_dir=data_dir,
            cache_dir=cache_dir,
        )
        if config.validation:  # lr tuning: hold out the end of the training set
            train, test = validation_split(train, config.validation)
        print(f"data: {config.dataset}, {len(train)} train / {len(test)} test; model {model_name}")
        if device != "cpu":  # keep the arrays on the accelerator: batches are gathered there
            train, test = (
                ArrayDataset(d.inputs.to(device), d.labels.to(device)) for d in (train, test)
            )
        _noise_report(config, build_model, train, out, device)
    if todo:
        outer = tqdm(total=len(runs), initial=len(runs) - len(todo), disable=not progress)
        for spec in todo:
            label = f"{spec.label} B={spec.batch_size} seed={spec.seed}"
            outer.set_description(label)
            with tqdm(total=spec.steps, leave=False, disable=not progress, desc="steps") as bar:
                result = train_run(
                    spec, train, test, build_model, device=device, on_step=lambda _: bar.update()
                )
            append_result(out, spec, result, n_train=len(train))
            outer.set_postfix(acc=f"{100 * result.test_accuracy:.1f}%")
            outer.update()
        outer.close()
    keys = {r.key() for r in runs}
    rows = [
        row
        for row in read_rows(out / RESULTS_FILE)
        if tuple(row.get(c, "") for c in KEY_COLUMNS) in keys
    ]
    if plots:
        plot_dir(out, keys)
    text = "## test accuracy (%)\n\n" + report(rows)
    if config.ema > 0:
        text += "\n\n## EMA test accuracy (%)\n\n" + report(rows, "ema_test_accuracy")
    if len(config.remedies) > 1:
        metric = "ema_test_accuracy" if config.ema > 0 else "test_accuracy"
        text += f"\n\n## remedies ({metric}, points; 95% t-intervals over seeds)\n\n"
        text += remedy_report(rows, metric)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return rows


def validation_split(train: ArrayDataset, size: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(train without its last ``size`` samples, those samples): the split lr is tuned on."""
    if not 0 < size < len(train):
        raise ValueError(f"validation must be in (0, {len(train)}), got {size}")
    cut = len(train) - size
    return (
        ArrayDataset(train.inputs[:cut], train.labels[:cut]),
        ArrayDataset(train.inputs[cut:], train.labels[cut:]),
    )


def _provenance() -> dict[str, str]:
    """Code versions of this invocation (float rounding, hence single runs, depend on them)."""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"git": commit or "unknown", "torch": torch.__version__}


def _noise_known(out: Path, config: SweepConfig) -> bool:
    path = out / "noise.json"
    return path.is_file() and json.loads(path.read_text()).get("noise_ratio") == config.noise_ratio


def _noise_report(config: SweepConfig, build_model, train, out: Path, device: str) -> None:
    """Print and save how the added noise compares with SGD's own noise at each B."""
    noise = gradient_noise(
        build_model,
        train,
        samples=512 if config.dataset == "mnist1d" else 128,
        chunk=64 if config.dataset == "mnist1d" else 8,
        max_grad_norm=config.max_grad_norm,
        device=device,
    )
    raw = noise_ratios(noise, config.noise_ratio, list(config.batch_sizes))
    clipped = noise_ratios(noise, config.noise_ratio, list(config.batch_sizes), clipped=True)
    summary = {**noise, "noise_ratio": config.noise_ratio, "isotropic_over_sgd": raw}
    summary["isotropic_over_clipped_sgd"] = clipped
    (out / "noise.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"noise at init: d = {noise['dim']:.0f}, tr(Sigma) = {noise['trace_sigma']:.3g} "
        f"(clipped {noise['trace_sigma_clipped']:.3g}); d (sigma/B)^2 = "
        f"{noise['dim'] * config.noise_ratio**2:.3g}"
    )
    print(
        "isotropic / SGD noise per B: "
        + ", ".join(f"{b}: {raw[b]:.2g} (clipped {clipped[b]:.2g})" for b in raw)
    )
