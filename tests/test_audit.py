"""The built-in audit: sensitivity_check, empirical_epsilon and ``fastdp audit``.

Each check is also run against a deliberately broken fastdp (clip factors forced to 1,
norms halved, a plain float32 ghost norm): an audit that cannot fail proves nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdp.audit import (
    AuditSetting,
    SensitivityError,
    clopper_pearson,
    empirical_epsilon,
    epsilon_from_rates,
    evaluate_threshold,
    sensitivity_check,
)
from fastdp.clipping import FlatClipping


def squared_error(output, target):
    return (output - target).square().sum()


def _mlp_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(12, 10, generator=generator)
    return model, (x, torch.randn(12, 3, generator=generator))


def _sequence_batch(seed: int = 0):
    """Linear(16, 16) on (B, 4, 16): 4 * (16 + 16) <= 16 * 16, so the ghost norm is the
    cheaper method and the ghost-cancelling canary applies."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(8, 4, 16, generator=generator)
    return nn.Linear(16, 16), (x, torch.randn(8, 4, 16, generator=generator))


# ---- statistics ---------------------------------------------------------------------------
def test_clopper_pearson_matches_closed_forms():
    n = 200
    low, high = clopper_pearson(0, n)
    assert float(low) == 0.0
    assert float(high) == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)
    low, high = clopper_pearson(n, n)
    assert float(low) == pytest.approx(0.025 ** (1 / n), rel=1e-9) and float(high) == 1.0
    low, high = clopper_pearson(np.array([10, 100]), n)
    assert np.all(low < np.array([10, 100]) / n) and np.all(np.array([10, 100]) / n < high)


def test_epsilon_from_rates():
    assert float(epsilon_from_rates(0.5, 0.5, 0.0)) == 0.0  # a coin flip: no evidence
    assert float(epsilon_from_rates(0.01, 0.2, 0.0)) == pytest.approx(math.log(0.8 / 0.01))
    assert float(epsilon_from_rates(0.2, 0.01, 0.0)) == pytest.approx(math.log(0.8 / 0.01))
    assert float(epsilon_from_rates(0.9, 0.9, 1e-5)) == 0.0  # worse than chance: floored


def test_threshold_is_chosen_on_held_out_trials():
    # selection half: perfectly separable; evaluation half: inside and outside swapped, so
    # a threshold fitted on the evaluated trials would look perfect, this one is wrong
    rng = np.random.default_rng(0)
    inside = np.concatenate([rng.normal(5, 1, 200), rng.normal(0, 1, 200)])
    outside = np.concatenate([rng.normal(0, 1, 200), rng.normal(5, 1, 200)])
    found = evaluate_threshold(inside, outside, delta=1e-5)
    assert found["eps_lb"] == 0.0 and found["n_eval"] == 200


# ---- sensitivity_check --------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "automatic", "per_layer"])
def test_sensitivity_check_passes_on_a_supported_model(clipping):
    model, batch = _mlp_batch()
    report = sensitivity_check(model, squared_error, batch, clipping=clipping, strict=True)
    assert report.ok and report.oracle_max_rel_diff < 1e-5
    by_name = {c.name: c for c in report.canaries}
    assert by_name["huge"].raw_norm > 1e6 and by_name["huge"].contribution <= 1 + 1e-3
    assert by_name["nan"].contribution == 0.0  # dropped
    assert by_name["ghost_pair"].status == "skipped"  # (B, d) inputs have no positions
    assert by_name["repeated_tokens"].status == "skipped"


def test_sensitivity_check_builds_token_canaries():
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 3)

        def forward(self, tokens):
            return self.head(self.embed(tokens).mean(1))

    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (8, 6))
    labels = torch.randint(0, 3, (8,))
    report = sensitivity_check(
        Classifier(), lambda o, y: F.cross_entropy(o, y, reduction="sum"), (tokens, labels)
    )
    assert report.ok
    statuses = {c.name: c.status for c in report.canaries}
    assert statuses == {
        "huge": "skipped",  # integer tokens and labels: nothing to scale
        "ghost_pair": "skipped",
        "nan": "skipped",
        "repeated_tokens": "ok",
        "zero": "ok",
    }


def test_sensitivity_check_catches_ghost_cancellation_in_a_naive_norm(monkeypatch):
    """A float32 ghost norm sum_{t,s} (a_t.a_s)(g_t.g_s), as fastdp had before certified
    norms: the ghost_pair canary's norm cancels to ~0 and it enters unclipped (~100 C)."""
    from fastdp.rules.linear import LinearRule, as_btd

    def naive_norm_sq(self, record):
        a = as_btd(record.saved["activations"]).float()
        g = as_btd(record.grad_output).float()
        norm_sq = (a @ a.transpose(1, 2) * (g @ g.transpose(1, 2))).sum((1, 2))
        if record.module.bias is not None:
            norm_sq = norm_sq + g.sum(1).square().sum(1)
        return norm_sq

    model, batch = _sequence_batch()
    monkeypatch.setattr(LinearRule, "norm_sq", naive_norm_sq)
    report = sensitivity_check(model, squared_error, batch, canaries=["ghost_pair"])
    ghost = report.canaries[0]
    assert not report.ok and ghost.status == "FAIL" and ghost.contribution > 10
    assert ghost.oracle_contribution <= 1 + 1e-6 and ghost.raw_norm > 50


def test_sensitivity_check_passes_the_ghost_pair_on_fastdp():
    model, batch = _sequence_batch()
    report = sensitivity_check(model, squared_error, batch, strict=True)
    ghost = next(c for c in report.canaries if c.name == "ghost_pair")
    assert ghost.variants == 4 and ghost.raw_norm > 50 and ghost.contribution <= 1 + 1e-3


@pytest.mark.parametrize("broken", ["factors are 1", "norms halved"])
def test_sensitivity_check_fails_on_broken_clipping(monkeypatch, broken):
    original = FlatClipping.factors
    if broken == "factors are 1":
        monkeypatch.setattr(FlatClipping, "factors", lambda self, norms: torch.ones_like(norms))
    else:
        monkeypatch.setattr(FlatClipping, "factors", lambda self, norms: original(self, norms / 2))
    model, batch = _mlp_batch()
    report = sensitivity_check(model, squared_error, batch, canaries=["huge", "zero"])
    huge = report.canaries[0]
    assert not report.ok and huge.status == "FAIL"
    assert huge.contribution > (1e3 if broken == "factors are 1" else 1.9)
    with pytest.raises(SensitivityError, match="huge"):
        sensitivity_check(model, squared_error, batch, canaries=["huge"], strict=True)


def test_sensitivity_check_takes_user_canaries():
    model, (x, y) = _mlp_batch()
    mine = (x[:1] * 1e3, y[:1])
    report = sensitivity_check(model, squared_error, (x, y), canaries={"mine": mine})
    assert [c.name for c in report.canaries] == ["mine"] and report.ok
    with pytest.raises(ValueError, match="unknown canaries"):
        sensitivity_check(model, squared_error, (x, y), canaries=["nope"])


# ---- empirical_epsilon --------------------------------------------------------------------
def test_empirical_epsilon_detects_broken_clipping(monkeypatch):
    """With factors forced to 1 the flat setting's canary (gradient 10 C) shifts the
    statistic by 10 sigma: on 500 held-out trials per side an error has probability < 1e-6,
    and even one error leaves eps_lb = 4.49 > 4.39 claimed, so the verdict is FAIL."""
    monkeypatch.setattr(FlatClipping, "factors", lambda self, norms: torch.ones_like(norms))
    flat = AuditSetting("flat-fixed", "flat", poisson_sampling=False)
    (result,) = empirical_epsilon(trials=2000, settings=(flat,), ideal_repeats=5).results
    assert result.verdict == "FAIL" and result.eps_lb > result.eps_claimed


# ---- the command line ---------------------------------------------------------------------
def test_audit_cli_quick(tmp_path, capsys):
    """``fastdp audit --quick`` (4000 runs per setting, ~20 s on 2 cores). Stated bounds:
    the control shifts the statistic by 10 sigma and the threshold lands near 5 sigma, so
    it is DETECTED (eps_lb 5.6 > 4.39) unless 6 or more of the 1000 held-out trials of one
    side err (each with probability ~3e-7). A correct private setting FAILs only if its 95%
    lower bound exceeds the claim: at a 1-sigma shift that needs an FPR upper bound below
    e^-4.39 (1 - FNR), i.e. ~0.4% false positives at a threshold that keeps 30% of the
    canary runs, where a Gaussian gives ~8%: probability far below 1e-6."""
    from fastdp.cli import main

    status = main(["audit", "--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "audit.json").read_text())
    verdicts = {r["setting"]: r["verdict"] for r in results["empirical_epsilon"]}
    assert verdicts == {
        "flat-fixed": "PASS",
        "flat-poisson": "PASS",
        "control-unclipped": "DETECTED",
    }
    for row in results["empirical_epsilon"]:
        assert row["trials"] == 4000 and row["ideal_eps_lb"] < row["eps_claimed"]
    assert set(results["sensitivity"]) == {"linear-seq", "mlp", "gpt"}
    assert status == (0 if results["ok"] else 1)
    for name in ("empirical_epsilon.csv", "sensitivity.csv", "empirical_epsilon.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "control-unclipped" in capsys.readouterr().out
