"""Tests of the batch-size sweep (fastdp.theory.experiments): protocol invariants,
reproducibility, resumption, the slope statistics, the CIFAR-10 pickle loader, and one
end-to-end sweep through the command line on a toy size."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from fastdp.models import mlp
from fastdp.theory.experiments import cli, sweep
from fastdp.theory.experiments.cifar10 import TRAIN_FILES, load_cifar10
from fastdp.theory.experiments.data import ArrayDataset, load_dataset
from fastdp.theory.experiments.protocol import ALGORITHMS, KEY_COLUMNS, REMEDIES, SweepConfig
from fastdp.theory.experiments.results import (
    RESULTS_FILE,
    paired_differences,
    read_rows,
    slope_per_doubling,
)
from fastdp.theory.experiments.train import train_run

TOY = SweepConfig(
    num_samples=300,
    batch_sizes=(8, 16, 32),
    steps=6,
    seeds=2,
    noise_ratio=0.01,
    lr=0.2,
    eval_points=2,
    ema=0.9,
    model="mlp",
)


def _toy_data(n: int = 240, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Two Gaussian blobs per class in 40 dimensions (no generator, no cache)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    centers = torch.randn(10, 40, generator=gen)
    inputs = centers[labels] + 0.5 * torch.randn(n, 40, generator=gen)
    split = n * 3 // 4
    return (
        ArrayDataset(inputs[:split], labels[:split]),
        ArrayDataset(inputs[split:], labels[split:]),
    )


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest (and not slowed by other jobs on shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build() -> torch.nn.Module:
    return mlp(in_features=40, hidden=16, depth=1, classes=10)


# ---- protocol invariants ------------------------------------------------------------------
def test_sweep_keeps_sigma_over_b_steps_and_lr_fixed():
    runs = TOY.runs()
    assert len(runs) == len(ALGORITHMS) * len(TOY.batch_sizes) * TOY.seeds
    assert {r.steps for r in runs} == {TOY.steps}
    assert {r.lr for r in runs} == {TOY.lr}
    for r in runs:
        if r.algorithm == "sgd":
            assert r.sigma == 0 and r.clipping == "none"
        else:
            assert r.sigma / r.batch_size == pytest.approx(TOY.noise_ratio, rel=1e-12)
            assert r.clipping == ("flat" if r.algorithm == "dp_sgd" else "none")
    # every algorithm sees every (B, seed), and the lr schedule does not depend on B
    combos = {(r.algorithm, r.batch_size, r.seed) for r in runs}
    assert len(combos) == len(runs)
    cosine = TOY.replace(schedule="cosine").runs()
    for step in (0, 3, 5):
        assert len({r.lr_at(step) for r in cosine}) == 1
    assert cosine[0].lr_at(0) == TOY.lr and cosine[0].eval_steps()[-1] == TOY.steps


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        SweepConfig(algorithms=("adam",))
    with pytest.raises(ValueError):
        SweepConfig(noise_ratio=-1.0)
    with pytest.raises(ValueError):
        SweepConfig(batch_sizes=())


# ---- reproducibility ----------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_seed_gives_identical_run(algorithm):
    train, test = _toy_data()
    spec = next(r for r in TOY.runs() if r.algorithm == algorithm and r.batch_size == 16)
    first = train_run(spec, train, test, _build)
    second = train_run(spec, train, test, _build)
    assert first.curve == second.curve
    assert first.train_loss == second.train_loss
    assert first.epsilon == second.epsilon or math.isinf(first.epsilon)
    assert first.curve[-1][0] == spec.steps
    other_seed = next(
        r for r in TOY.runs() if (r.algorithm, r.batch_size, r.seed) == (algorithm, 16, 1)
    )
    reseeded = train_run(other_seed, train, test, _build)
    assert (reseeded.curve, reseeded.train_loss) != (first.curve, first.train_loss)


def test_dp_sgd_reports_finite_epsilon_and_noisy_runs_inf():
    train, test = _toy_data()
    runs = {r.algorithm: r for r in TOY.runs() if r.batch_size == 32 and r.seed == 0}
    assert math.isfinite(train_run(runs["dp_sgd"], train, test, _build).epsilon)
    assert math.isinf(train_run(runs["noisy_sgd"], train, test, _build).epsilon)


# ---- resumption ---------------------------------------------------------------------------
def test_resumption_skips_finished_runs(tmp_path, monkeypatch):
    data = _toy_data()
    monkeypatch.setattr(sweep, "load_dataset", lambda *a, **k: data)
    monkeypatch.setattr(sweep, "model_factory", lambda dataset, model: ("mlp", _build))
    config = TOY.replace(batch_sizes=(8, 16), seeds=1, algorithms=("sgd", "dp_sgd"))
    rows = sweep.run_sweep(config, tmp_path, progress=False, plots=False)
    assert len(rows) == 4
    calls = []
    real_train_run = sweep.train_run

    def counting(spec, *args, **kwargs):
        calls.append(spec.key())
        return real_train_run(spec, *args, **kwargs)

    monkeypatch.setattr(sweep, "train_run", counting)
    again = sweep.run_sweep(config, tmp_path, progress=False, plots=False)
    assert calls == [] and again == rows
    grown = sweep.run_sweep(config.replace(seeds=2), tmp_path, progress=False, plots=False)
    assert len(calls) == 4 and {c[KEY_COLUMNS.index("seed")] for c in calls} == {"1"}
    assert len(grown) == 8 and len(read_rows(tmp_path / RESULTS_FILE)) == 8


# ---- statistics ---------------------------------------------------------------------------
def test_slope_per_doubling_recovers_a_known_slope():
    by_batch = {b: {s: 0.8 - 0.03 * math.log2(b) + 0.01 * s for s in range(3)} for b in (32, 64)}
    by_batch[128] = {s: 0.8 - 0.03 * 7 + 0.01 * s for s in range(3)}
    fit = slope_per_doubling(by_batch)
    assert fit["slope"] == pytest.approx(-0.03)
    assert fit["se_seeds"] == pytest.approx(0.0, abs=1e-12)
    assert fit["ci_low"] == pytest.approx(-0.03) and fit["ci_high"] == pytest.approx(-0.03)


def test_paired_differences_subtract_sgd_at_the_same_seed():
    table = {
        "sgd": {8: {0: 0.5, 1: 0.6}, 16: {0: 0.7}},
        "dp_sgd": {8: {0: 0.4, 1: 0.3}, 16: {0: 0.6, 1: 0.9}},
    }
    diffs = paired_differences(table)
    assert list(diffs) == ["dp_sgd"]
    assert diffs["dp_sgd"][8] == pytest.approx({0: -0.1, 1: -0.3})
    assert diffs["dp_sgd"][16] == pytest.approx({0: -0.1})  # seed 1 has no sgd partner


# ---- CIFAR-10 loader ----------------------------------------------------------------------
def _write_fake_cifar(folder, per_batch: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in (*TRAIN_FILES, "test_batch"):
        entry = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_loader_reads_python_pickles(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path / "flat"
    _write_fake_cifar(folder)
    x, y, x_test, y_test = load_cifar10(tmp_path if nested else folder)
    assert x.shape == (20, 3, 32, 32) and x_test.shape == (4, 3, 32, 32)
    assert x.dtype == np.float32 and y.dtype == np.int64 and y_test.shape == (4,)
    assert np.allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert np.allclose(x.std(axis=(0, 2, 3)), 1, atol=1e-3)
    with open(folder / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle)
    first = raw[b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255.0
    assert np.corrcoef(first.ravel(), x[0].ravel())[0, 1] > 0.99  # channel-major layout kept
    assert y[:4].tolist() == raw[b"labels"]
    train, test = load_dataset("cifar10", data_dir=tmp_path if nested else folder)
    assert len(train) == 20 and train[0][0].shape == (3, 32, 32)


def test_cifar10_missing_files_say_where_to_put_them(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as info:
        load_cifar10(tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(info.value)
    code = cli.main(["batch-sweep", "--dataset", "cifar10", "--out", str(tmp_path / "o")])
    assert code == 1 and "--data-dir" in capsys.readouterr().err
    code = cli.main(
        [
            "batch-sweep",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    assert code == 1 and "data_batch_1" in capsys.readouterr().err


# ---- end to end ---------------------------------------------------------------------------
def test_quick_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    argv = ["batch-sweep", "--quick", "--out", str(out), "--cache-dir", str(tmp_path)]
    argv += ["--num-samples", "400", "--batch-sizes", "8", "16", "32", "--steps", "8"]
    argv += ["--seeds", "2", "--no-progress"]
    assert cli.main(argv) == 0
    rows = read_rows(out / RESULTS_FILE)
    assert len(rows) == 3 * 3 * 2
    required = "algorithm batch_size sigma steps seed lr test_accuracy train_loss epsilon"
    for row in rows:
        for column in (*required.split(), "wall_seconds"):
            assert row[column] != ""
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert row["steps"] == "8" and row["num_samples"] == "400"
        assert math.isfinite(float(row["epsilon"])) == (row["algorithm"] == "dp_sgd")
    for name in ("accuracy_vs_batch.png", "accuracy_vs_step.png", "report.md", "curves.csv"):
        assert (out / name).is_file()
    assert list(tmp_path.glob("mnist1d_n400_seed42.npz"))  # the generated arrays are cached
    assert cli.main(argv) == 0 and len(read_rows(out / RESULTS_FILE)) == 18  # nothing rerun
    assert cli.main(["report", str(out), "--batch-sizes", "16", "32"]) == 0


# ---- remedies (issue 13) ------------------------------------------------------------------
def test_remedies_keep_sigma_over_b_and_scale_lr_only_where_asked():
    config = TOY.replace(remedies=tuple(REMEDIES), lr_ref_batch=8, lrs=(("dp_sgd", 2.0),))
    runs = config.runs()
    assert len(runs) == len(REMEDIES) * 3 * 3 * 2
    for run in runs:
        assert run.sigma == config.sigma(run.algorithm, run.batch_size)
        assert run.steps == config.steps
        base_lr = 2.0 if run.algorithm == "dp_sgd" else config.lr
        assert run.lr == base_lr
        ratio = run.batch_size / 8
        expected = {"lr_linear_warmup": ratio, "lr_sqrt": math.sqrt(ratio)}.get(run.remedy, 1.0)
        assert run.lr_at(run.steps - 1) == pytest.approx(base_lr * expected)
        if run.remedy == "lr_linear_warmup":  # warm-up over 10% of S (at least one step)
            assert run.lr_at(0) < run.lr_at(run.steps - 1) or run.steps * 0.1 <= 1
    keys = [r.key() for r in runs]
    assert len(set(keys)) == len(keys)
    baseline = TOY.runs()[0]
    assert baseline.identity()["remedy"] == "" and baseline.label == baseline.algorithm
    with pytest.raises(ValueError, match="unknown remedies"):
        TOY.replace(remedies=("magic",))


def test_multiplicity_run_trains_on_views():
    train, test = _toy_data()
    config = TOY.replace(remedies=("mult4",), batch_sizes=(16,), steps=3)
    spec = config.runs()[0]
    assert spec.fix.views == 4 and spec.fix.augment
    seen = []
    model = mlp(40, hidden=16, depth=1)
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    result = train_run(spec, train, test, lambda: model)
    assert 0.0 <= result.test_accuracy <= 1.0
    training_rows = [r for r in seen if r % 4 == 0 and r != len(test)]
    assert training_rows and all(r % 4 == 0 for r in training_rows)


def test_quick_remedies_end_to_end(tmp_path):
    out = tmp_path / "remedies"
    argv = ["remedies", "--quick", "--out", str(out), "--cache-dir", str(tmp_path)]
    argv += ["--num-samples", "400", "--batch-sizes", "8", "32", "--steps", "6"]
    argv += ["--seeds", "2", "--no-progress", "--lr-for", "noisy_sgd=0.3"]
    assert cli.main(argv) == 0
    rows = read_rows(out / RESULTS_FILE)
    assert len(rows) == len(REMEDIES) * 2 * 2 * 2  # remedies x B x algorithms x seeds
    assert {r["remedy"] for r in rows} == {""} | (set(REMEDIES) - {"baseline"})
    assert {r["lr"] for r in rows if r["algorithm"] == "noisy_sgd"} == {"0.3"}
    text = (out / "report.md").read_text()
    assert "## remedies" in text and "noisy_sgd+mult8" in text and "gain at B=32" in text


def test_validation_split_holds_out_the_end_of_train():
    train, _ = _toy_data()
    fit, held = sweep.validation_split(train, 30)
    assert len(fit) == len(train) - 30 and len(held) == 30
    assert torch.equal(held.inputs, train.inputs[-30:])
    with pytest.raises(ValueError):
        sweep.validation_split(train, len(train))
