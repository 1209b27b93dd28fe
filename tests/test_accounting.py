"""Accounting goes through Opacus's accountants; calibration and the TAN helpers."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from oracle import per_sample_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.accounting import planned_epsilon, scale_noise


def _train(engine, steps_epochs=1, calibrate=False, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = DataLoader(TensorDataset(torch.randn(100, 3), torch.randn(100, 1)), batch_size=10)
    make = engine.make_private_with_epsilon if calibrate else engine.make_private
    m, opt, loader = make(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=data,
        max_grad_norm=1.0,
        seed=0,
        **kwargs,
    )
    for _ in range(steps_epochs):
        for xb, yb in loader:
            per_sample_loss(m(xb), yb).mean().backward()
            opt.step()
            opt.zero_grad()
    return opt


@pytest.mark.parametrize("name, reference", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_epsilon_equals_opacus_accountant(name, reference):
    engine = fastdp.PrivacyEngine(accountant=name)
    assert engine.get_epsilon(1e-5) == 0.0
    opt = _train(engine, steps_epochs=2, noise_multiplier=1.3)
    acc = reference()
    for _ in range(opt.logical_step):
        acc.step(noise_multiplier=1.3, sample_rate=0.1)
    assert engine.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert planned_epsilon(1.3, 0.1, 20, 1e-5, name) == pytest.approx(
        acc.get_epsilon(delta=1e-5), rel=1e-6
    )


def test_make_private_with_epsilon_lands_within_one_percent():
    engine = fastdp.PrivacyEngine(accountant="rdp")
    opt = _train(
        engine, steps_epochs=3, calibrate=True, target_epsilon=2.0, target_delta=1e-5, epochs=3
    )
    assert opt.logical_step == 30
    assert abs(engine.get_epsilon(1e-5) / 2.0 - 1) < 0.01


def test_noisy_sgd_has_no_guarantee():
    engine = fastdp.PrivacyEngine()
    _train(engine, noise_multiplier=1.0, clipping="none")
    assert math.isinf(engine.get_epsilon(1e-5))


def test_scale_noise_keeps_sigma_over_b_and_epsilon_grows_with_rate():
    assert scale_noise(1.0, 256, 4096) / 4096 == pytest.approx(1.0 / 256)
    small = planned_epsilon(scale_noise(1.0, 256, 256), 256 / 50000, 1000, 1e-5)
    large = planned_epsilon(scale_noise(1.0, 256, 4096), 4096 / 50000, 1000, 1e-5)
    assert large < small  # TAN: at fixed sigma/B and steps, the larger batch is more private
    with pytest.raises(ValueError, match="sample_rate"):
        planned_epsilon(1.0, 1.5, 10, 1e-5)


def test_prv_falls_back_to_rdp_below_min_noise_with_warning():
    from fastdp.accounting import PRV_MIN_NOISE

    sigma = PRV_MIN_NOISE / 4
    with pytest.warns(RuntimeWarning, match="RDP accountant"):
        eps = planned_epsilon(sigma, 0.01, 100, 1e-5, "prv")
    assert eps == pytest.approx(planned_epsilon(sigma, 0.01, 100, 1e-5, "rdp"))
