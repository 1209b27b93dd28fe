"""Privacy accounting through Opacus's accountants, plus the TAN helpers.

fastdp does not reimplement accounting: ``make_accountant`` returns Opacus's PRV or RDP
accountant, fed (sigma, q) once per logical step. The helpers answer planning questions
before any training: what epsilon a (sigma, q, steps) run will have, which sigma reaches a
target epsilon, and how sigma scales with the batch at fixed sigma/B (TAN: a small-batch run
at the same sigma/B simulates the large-batch one).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # opacus takes seconds to import: load it when an accountant is made
    from opacus.accountants import IAccountant

ACCOUNTANTS = ("prv", "rdp")


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}")
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


def planned_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
) -> float:
    """Epsilon of a run of ``steps`` logical steps at (sigma, q), computed before training.

    sigma = 0 gives inf (no noise, no guarantee); zero steps give 0.
    """
    _check_rate(sample_rate)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def noise_for_epsilon(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
) -> float:
    """The smallest sigma whose (q, steps) run has epsilon <= target (within 0.5%)."""
    _check_rate(sample_rate)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005 * target_epsilon,
        )
    )


def scale_noise(sigma_ref: float, batch_ref: float, batch: float) -> float:
    """sigma for batch ``batch`` at the same sigma/B as (sigma_ref, batch_ref) (TAN)."""
    if batch_ref <= 0 or batch <= 0:
        raise ValueError("batch sizes must be > 0")
    return sigma_ref * batch / batch_ref


def _check_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
