"""Logical batches: Poisson sampling, micro-batches, empty batches, accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import per_sample_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.data import poisson_indices


def test_poisson_rate_matches_q_within_bound():
    n, q, steps = 5000, 0.02, 200
    counts = torch.tensor([len(poisson_indices(n, q, seed=1, step=t)) for t in range(steps)])
    total = float(counts.sum())
    expected = n * q * steps
    # total ~ Binomial(n * steps, q): allow 5 standard deviations
    assert abs(total - expected) < 5 * math.sqrt(n * steps * q * (1 - q))
    # batch sizes vary like Binomial(n, q): their variance within 30% of n q (1 - q)
    assert abs(float(counts.float().var()) / (n * q * (1 - q)) - 1) < 0.3
    # membership is uniform over indices: first and second half equally often
    first_half = sum(int((poisson_indices(n, q, 1, t) < n // 2).sum()) for t in range(steps))
    assert abs(first_half - total / 2) < 5 * math.sqrt(total / 4)


def test_poisson_reproducible_and_distinct_indices():
    a = poisson_indices(1000, 0.1, seed=5, step=3)
    assert torch.equal(a, poisson_indices(1000, 0.1, seed=5, step=3))
    assert not torch.equal(a, poisson_indices(1000, 0.1, seed=5, step=4))
    assert len(torch.unique(a)) == len(a) and int(a.max()) < 1000 and int(a.min()) >= 0


def _run(n=40, batch=10, micro=None, poisson=False, sigma=0.0, seed=0, epochs=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(n, 4), torch.randn(n, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = fastdp.PrivacyEngine()
    m, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch),
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        poisson_sampling=poisson,
        max_physical_batch_size=micro,
        seed=seed,
    )
    sizes, updated = [], []
    for _ in range(epochs):
        for xb, yb in loader:
            sizes.append(len(xb))
            before = [p.detach().clone() for p in m.parameters()]
            per_sample_loss(m(xb), yb).mean().backward()
            opt.step()
            opt.zero_grad()
            moved = any(not torch.equal(b, p) for b, p in zip(before, m.parameters()))
            assert moved == opt.last_step_updated
            updated.append(opt.last_step_updated)
    return m, opt, loader, sizes, updated, engine


def test_micro_batches_bounded_and_params_move_only_at_logical_end():
    m, opt, loader, sizes, updated, _ = _run(n=40, batch=20, micro=6)
    assert loader.logical_steps_per_epoch == 2
    assert sizes == [6, 6, 6, 2, 6, 6, 6, 2]
    assert updated == [False, False, False, True] * 2
    assert opt.logical_step == 2


def test_split_logical_batch_equals_one_physical_batch():
    whole = _run(batch=20)[0]
    split = _run(batch=20, micro=3)[0]
    for a, b in zip(whole.parameters(), split.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_poisson_expected_batch_normaliser_and_steps():
    m, opt, loader, sizes, updated, engine = _run(n=200, batch=20, poisson=True, micro=8)
    assert loader.sample_rate == pytest.approx(0.1)
    assert loader.logical_steps_per_epoch == 10
    assert opt.expected_batch_size == pytest.approx(20.0)
    assert sum(updated) == 10 and max(sizes) <= 8
    assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 10


def test_empty_poisson_batches_are_noised():
    # q = 1/N: a logical batch is empty with probability (1 - q)^N ~ 1/e, yet every step
    # adds noise once and leaves finite parameters
    n = 1000
    m, opt, loader, sizes, updated, _ = _run(n=n, batch=1, poisson=True, sigma=1.0, micro=4)
    empty = sizes.count(0)
    p_empty = (1 - 1 / n) ** n
    assert abs(empty - n * p_empty) < 5 * math.sqrt(n * p_empty * (1 - p_empty))
    assert opt.logical_step == n and sum(updated) == n
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_empty_batch_step_moves_parameters_by_noise_only():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    x, y = torch.randn(1000, 3), torch.randn(1000, 2)
    m, opt, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=0,
    )
    for t in range(3000):
        if len(loader.micro_batches(t)[0]) == 0:
            opt.run.logical_step = t
            break
    xb, yb = next(iter(loader))
    assert len(xb) == 0
    per_sample_loss(m(xb), yb).mean().backward()
    opt.step()
    assert not torch.equal(before, model.weight) and torch.isfinite(model.weight).all()


def test_loader_refuses_step_skipping():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    m, opt, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 2)), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    with pytest.raises(RuntimeError, match="call optimizer.step"):
        for _ in loader:
            pass


def test_accumulator_is_float32_for_bf16_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(torch.bfloat16)
    x, y = torch.randn(8, 4, dtype=torch.bfloat16), torch.randn(8, 2, dtype=torch.bfloat16)
    m, opt, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        max_physical_batch_size=4,
    )
    xb, yb = next(iter(loader))
    per_sample_loss(m(xb), yb).mean().backward()
    assert all(buf.dtype == torch.float64 for buf in opt.grad_sums.values())  # see buffer_for
