"""`fastdp theory lls|dln`: files, columns, routing through `fastdp`, determinism."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fastdp.cli import main as fastdp_main
from fastdp.theory import cli

DLN_REQUIRED = {"method", "sigma", "seed", "alpha", "steps", "final_distance", "alpha_inf"}


def _read(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_lls_writes_the_comparison_table(tmp_path):
    assert (
        cli.main(["lls", "--quick", "--out", str(tmp_path), "--seeds", "6", "--steps", "400"]) == 0
    )
    rows = _read(tmp_path / "results.csv")
    with (tmp_path / "results.csv").open() as handle:
        assert handle.readline().strip() == "quantity,predicted,measured"
    quantities = {r["quantity"] for r in rows}
    assert "under/ou_sde/isotropic_constant" in quantities
    assert any(q.startswith("over/") and "theorem1" in q for q in quantities)
    for row in rows:  # plain numbers, no numpy reprs
        assert math.isfinite(float(row["predicted"])) and math.isfinite(float(row["measured"]))
    iso = next(r for r in rows if r["quantity"] == "under/ou_sde/isotropic_constant")
    assert float(iso["predicted"]) == 0.5
    for name in ("lls_predicted_vs_measured", "lls_covariance_vs_batch", "lls_theorem1"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["chains"] == 6 and config["steps"] == 400


def test_dln_rows_are_one_per_run_and_deterministic(tmp_path):
    args = ["dln", "--seeds", "2", "--steps", "300"]
    assert fastdp_main(["theory", *args, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 0
    rows = _read(tmp_path / "a" / "results.csv")
    assert DLN_REQUIRED <= set(rows[0])
    sigmas = cli.DLN_PRESETS["full"].sigmas
    assert len(rows) == 2 * (1 + 1 + len(sigmas))  # gd, minibatch sgd, the sigma sweep
    assert {r["method"] for r in rows} == {"gd", "sgd", "noisy_sgd"}
    assert {int(r["seed"]) for r in rows} == {0, 1}
    assert all(int(r["steps"]) == 300 for r in rows)
    gd = [r for r in rows if r["method"] == "gd"]
    assert all(float(r["alpha_inf"]) == pytest.approx(0.1) for r in gd)
    a = (tmp_path / "a" / "results.csv").read_text()
    assert a == (tmp_path / "b" / "results.csv").read_text()
    for name in ("dln_distance_over_time", "dln_final_distance_vs_sigma"):
        assert (tmp_path / "a" / f"{name}.png").stat().st_size > 1000
    assert _read(tmp_path / "a" / "summary.csv")


def test_bad_model_is_rejected():
    with pytest.raises(SystemExit):
        cli.main(["mlp"])
