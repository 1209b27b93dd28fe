"""Privacy accounting through Opacus's accountants, plus the TAN helpers.

fastdp does not reimplement accounting: ``make_accountant`` returns Opacus's PRV or RDP
accountant, fed (sigma, q) once per logical step. The helpers answer planning questions
before any training: what epsilon a (sigma, q, steps) run will have, which sigma reaches a
target epsilon, and how sigma scales with the batch at fixed sigma/B (TAN: a small-batch run
at the same sigma/B simulates the large-batch one).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # opacus takes seconds to import: load it when an accountant is made
    from opacus.accountants import IAccountant

ACCOUNTANTS = ("prv", "rdp")


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}")
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


# Opacus's PRV accountant discretises the privacy-loss distribution on a grid whose size
# grows as sigma falls: at sigma ~ 0.03 it asks for tens of GB, at 0.13 it takes a minute.
# Below this sigma fastdp answers with the RDP accountant (a valid, looser upper bound) and
# says so; epsilons there are in the hundreds or more anyway.
PRV_MIN_NOISE = 0.5


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of a (sigma, q, steps) history with the named Opacus accountant
    (RDP instead of PRV below PRV_MIN_NOISE, with a warning)."""
    if not history:
        return 0.0
    if accountant == "prv" and min(h[0] for h in history) < PRV_MIN_NOISE:
        warnings.warn(
            f"noise_multiplier < {PRV_MIN_NOISE}: the PRV accountant's grid becomes too large "
            "to compute (tens of GB); reporting the RDP accountant's epsilon, a valid upper "
            "bound. Pass accountant='rdp' to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        accountant = "rdp"
    acc = make_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


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
    return epsilon_of([(noise_multiplier, sample_rate, steps)], delta, accountant)


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
