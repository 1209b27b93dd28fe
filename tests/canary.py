"""Shared helpers of the attack tests (tests/attacks/).

The canary measurement: noise off, SGD lr = 1, summed loss, so how far a step moves the
weights is the sum of the clipped per-sample gradients; with every honest sample's gradient
zero it is the canary's whole contribution, which must stay at or under C (1 + 2^-10).

An attack test ends in one of two ways: the attack is refused, asserted with
``pytest.raises(<type>, match=<the cause in the message>)``, or it runs and the bound holds
(``check``, ``sums_distance``). Never "any ValueError": an unrelated bug must fail the test.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp

KAPPA = 2.0**-10
C = 1.0
# still imported by tests/test_attacks_round4..7.py until they move to tests/attacks/; new
# tests assert the exact refusal instead
REFUSED = (ValueError, RuntimeError)


def private(model: nn.Module, x, y, **kwargs):
    """make_private on one batch of (x, y) at C, noise 0, summed loss, seed 0 (keyword
    arguments override). Returns (model, optimizer, loader)."""
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    options = dict(noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=False, seed=0)
    options.update(kwargs)
    options.setdefault("loss_reduction", "sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastdp.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, **options
        )


def make(model: nn.Module, x, y, **kwargs):
    """make_private with the engine: (engine, model, optimizer, loader). Defaults: noise 0,
    C = 1, no Poisson sampling, the RDP accountant, one batch of len(x), SGD lr = 1; the
    keywords ``accountant``, ``batch_size`` and ``lr`` set those, the rest go to
    make_private."""
    options = dict(noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=False)
    options.update(kwargs)
    engine = fastdp.PrivacyEngine(accountant=options.pop("accountant", "rdp"))
    batch = options.pop("batch_size", len(x))
    lr = options.pop("lr", 1.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine, *engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, **options
        )


def snapshot(model: nn.Module) -> dict:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def moved(model: nn.Module, before: dict) -> float:
    """The norm of the change of all parameters since ``before`` (a ``snapshot``)."""
    return float(
        sum((p.detach().double() - before[n]).square().sum() for n, p in model.named_parameters())
        ** 0.5
    )


def sums_distance(a: dict, b: dict) -> float:
    """||a - b|| over two dicts of clipped sums with the same keys (float64)."""
    return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in a))


def norm(sums: dict) -> float:
    """||sums|| over a dict of clipped sums (float64)."""
    return math.sqrt(sum(float(g.double().square().sum()) for g in sums.values()))


def check(moved_by: float | None) -> None:
    """The canary's contribution is at most C (1 + 2^-10). (None, "refused", is accepted only
    for the round files not yet moved to tests/attacks/.)"""
    if moved_by is None:
        return
    assert moved_by <= C * (1 + KAPPA), f"canary moved the weights by {moved_by:.4f} C"


D = 3
U = torch.tensor([1.0, 2.0, 2.0]) / 3  # a unit direction in R^D


def centring_batch():
    """The canary c (x = 10 e0, target -5u) and an honest h (x = 0, target +5u). Centred
    inputs are +-5 e0: BOTH gradients are 50 u e0^T (each clipped to C, same direction);
    without the canary, h alone has a zero centred input and a zero gradient. A model that
    centres over the batch therefore gives the canary a contribution of 2 C."""
    x = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.stack([-5.0 * U, 5.0 * U])
    return x, y


# The causes fastdp names when it refuses (matched against the message, not the type alone).
MIXING = "depends on the other samples"
NOT_BATCH_FIRST = "is not batch-first"
SECOND_PASS = "second forward pass in one micro-batch"
OUTSIDE_FORWARD = "outside the forward of the model made private"
IN_BACKWARD = "called during a backward pass"
UNMATCHED_RECOMPUTE = "called in backward outside a reentrant activation checkpoint"
BACKPROPAGATED_TWICE = "backpropagated twice"
MIXED_GRAD_MODES = "called both with autograd off"
