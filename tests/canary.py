"""Canary measurement shared by the attack tests: noise off, SGD lr = 1, summed loss, so how
far a step moves the weights is the sum of the clipped per-sample gradients; with every
honest sample's gradient zero it is the canary's whole contribution, which must stay at or
under C (1 + 2^-10)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp

REFUSED = (ValueError, RuntimeError)
KAPPA = 2.0**-10
C = 1.0


def private(model: nn.Module, x, y, **kwargs):
    """make_private on one batch of (x, y) at C, noise 0 (keyword arguments override)."""
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


def snapshot(model: nn.Module) -> dict:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def moved(model: nn.Module, before: dict) -> float:
    """The norm of the change of all parameters since ``before`` (a ``snapshot``)."""
    return float(
        sum((p.detach().double() - before[n]).square().sum() for n, p in model.named_parameters())
        ** 0.5
    )


def check(moved_by: float | None) -> None:
    """None: the attack was refused (fine); else the canary's contribution is at most C."""
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
