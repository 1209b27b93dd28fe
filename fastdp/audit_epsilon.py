"""The canary-in / canary-out statistical audit: an empirical lower bound on epsilon.

A DP-SGD step is (eps, delta)-DP, so no test that guesses from the released parameters
whether a sample was in the batch can do better than FPR e^eps + FNR >= 1 - delta (and the
same with FPR and FNR swapped). The audit (Nasr et al. 2021, "Adversary instantiation";
bounds as in Steinke, Nasr, Jagielski 2023) plays that adversary against fastdp itself:

1. Many independent one-step runs through the public API (a fresh ``PrivacyEngine`` each,
   ``seed=None``), half with a canary sample in the dataset, half with the canary replaced by
   a zero sample (its gradient is exactly zero, so this is removal, and N and q stay equal).
2. The canary's clipped gradient has a known unit direction u (its feature is zero in every
   other sample, so the others' gradients are orthogonal to u); the statistic of a run is
   the parameter update projected on u, in units of C: N(1, sigma^2) with the canary and
   N(0, sigma^2) without, for a correct implementation.
3. A threshold (and the side of it that means "in") is chosen on the first half of the
   trials; on the second half the false-positive and false-negative counts get two-sided
   Clopper-Pearson intervals, and
       eps_lb = max(log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub)),
   a lower bound on the true epsilon with 95% confidence.

A correct implementation has eps_lb <= the accountant's epsilon (verdict PASS). The positive
control (clipping="none" with a canary gradient far above C, accounted as if clipped at C)
must be DETECTED (eps_lb > eps claimed), which shows the audit has the power to see a leak.
The ideal column is the median eps_lb a perfect Gaussian mechanism reaches with the same
trial counts and procedure (simulated), i.e. how close to the claim this audit can get.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES = 8  # the audit model: Linear(8, 1, bias=False); feature 7 belongs to the canary
N_BASE = 15  # ordinary samples in every run's dataset (plus the canary or its zero stand-in)


@dataclass(frozen=True)
class AuditSetting:
    """One audited configuration. ``canary_norm`` is the canary's raw gradient norm in units
    of C; ``control`` marks the positive control, whose leak the audit must detect."""

    name: str
    clipping: str
    poisson_sampling: bool
    canary_norm: float = 10.0
    control: bool = False

    def describe(self, sample_rate: float) -> str:
        sampling = f"Poisson q={sample_rate:g}" if self.poisson_sampling else "fixed batch q=1"
        clip = "no clipping, accounted at C" if self.control else f"{self.clipping} clipping"
        return f"{clip}, {sampling}, canary gradient {self.canary_norm:g} C"


SETTINGS = (
    AuditSetting("flat-fixed", "flat", poisson_sampling=False),
    AuditSetting("flat-poisson", "flat", poisson_sampling=True),
    AuditSetting("control-unclipped", "none", poisson_sampling=False, control=True),
)


@dataclass
class SettingResult:
    """One row of the audit: the claim, the measured bound and the verdict."""

    setting: str
    description: str
    trials: int  # runs in total (half with the canary); half of each side is held out
    noise_multiplier: float
    sample_rate: float
    delta: float
    eps_claimed: float
    eps_lb: float  # 95% lower bound (Clopper-Pearson upper bounds on FPR and FNR)
    eps_hat: float  # from the observed rates
    eps_hi: float  # upper end of the interval (Clopper-Pearson lower bounds on the rates)
    ideal_eps_lb: float  # median eps_lb of a perfect Gaussian mechanism, same procedure
    threshold: float
    guess_in_above: bool
    false_positives: int
    false_negatives: int
    n_eval: int  # evaluated trials per side
    verdict: str  # PASS / FAIL (private settings), DETECTED / MISSED (control)
    ok: bool
    seconds: float


@dataclass
class EpsilonAudit:
    results: list[SettingResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def rows(self) -> list[dict]:
        return [asdict(r) for r in self.results]

    def table(self) -> str:
        """eps_lb is the lower end of the 95% interval [eps_lb, eps_hi] around eps_hat."""
        head = f"{'setting':<20}{'trials':>7}{'eps claimed':>12}{'eps_lb':>8}"
        head += f"{'eps_hat [95% CI]':>23}{'ideal eps_lb':>13}  verdict"
        lines = [head]
        for r in self.results:
            estimate = f"{_fmt(r.eps_hat)} [{r.eps_lb:.2f}, {_fmt(r.eps_hi)}]"
            lines.append(
                f"{r.setting:<20}{r.trials:>7}{r.eps_claimed:>12.2f}{r.eps_lb:>8.2f}"
                f"{estimate:>23}{r.ideal_eps_lb:>13.2f}  {r.verdict}"
            )
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


# ---- statistics ---------------------------------------------------------------------------
def clopper_pearson(k, n: int, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper-Pearson interval of a binomial rate, k successes out of n (k may be
    an array): each end holds with probability (1 + confidence) / 2."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=float)
    tail = (1.0 - confidence) / 2.0
    lower = np.where(k > 0, beta.ppf(tail, np.maximum(k, 1), n - k + 1), 0.0)
    upper = np.where(k < n, beta.ppf(1.0 - tail, k + 1, np.maximum(n - k, 1)), 1.0)
    return lower, upper


def epsilon_from_rates(fpr, fnr, delta: float) -> np.ndarray:
    """max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)), floored at 0."""
    fpr, fnr = np.asarray(fpr, dtype=float), np.asarray(fnr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.maximum(1.0 - delta - fnr, 0.0) / fpr)
        two = np.log(np.maximum(1.0 - delta - fpr, 0.0) / fnr)
    best = np.nan_to_num(np.maximum(one, two), nan=0.0, neginf=0.0, posinf=np.inf)
    return np.maximum(best, 0.0)


def _error_counts(inside: np.ndarray, outside: np.ndarray, thresholds: np.ndarray, above: bool):
    """False positives and negatives of the test 'in iff s > t' (or s < t) for each t."""
    inside, outside = np.sort(inside), np.sort(outside)
    if above:  # FP: out > t; FN: in <= t
        fp = len(outside) - np.searchsorted(outside, thresholds, side="right")
        fn = np.searchsorted(inside, thresholds, side="right")
    else:  # FP: out < t; FN: in >= t
        fp = np.searchsorted(outside, thresholds, side="left")
        fn = len(inside) - np.searchsorted(inside, thresholds, side="left")
    return fp, fn


def choose_threshold(
    inside: np.ndarray, outside: np.ndarray, delta: float, confidence: float
) -> tuple[float, bool]:
    """The (threshold, side) that maximises the Clopper-Pearson eps lower bound on these
    (selection) trials; candidates are the midpoints between sorted observations."""
    values = np.sort(np.concatenate([inside, outside]))
    candidates = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2])
    best = (-1.0, float(candidates[0]), True)
    for above in (True, False):
        fp, fn = _error_counts(inside, outside, candidates, above)
        eps = epsilon_from_rates(
            clopper_pearson(fp, len(outside), confidence)[1],
            clopper_pearson(fn, len(inside), confidence)[1],
            delta,
        )
        i = int(np.argmax(eps))
        if eps[i] > best[0]:
            best = (float(eps[i]), float(candidates[i]), above)
    return best[1], best[2]


def evaluate_threshold(
    inside: np.ndarray, outside: np.ndarray, delta: float, confidence: float = 0.95
) -> dict:
    """Threshold from the first half of each side, bounds from the second half."""
    half_in, half_out = len(inside) // 2, len(outside) // 2
    threshold, above = choose_threshold(inside[:half_in], outside[:half_out], delta, confidence)
    test_in, test_out = inside[half_in:], outside[half_out:]
    fp, fn = (int(c[0]) for c in _error_counts(test_in, test_out, np.array([threshold]), above))
    fpr_lo, fpr_hi = clopper_pearson(fp, len(test_out), confidence)
    fnr_lo, fnr_hi = clopper_pearson(fn, len(test_in), confidence)
    return {
        "threshold": threshold,
        "guess_in_above": above,
        "false_positives": fp,
        "false_negatives": fn,
        "n_eval": min(len(test_in), len(test_out)),
        "eps_lb": float(epsilon_from_rates(fpr_hi, fnr_hi, delta)),
        "eps_hat": float(epsilon_from_rates(fp / len(test_out), fn / len(test_in), delta)),
        "eps_hi": float(epsilon_from_rates(fpr_lo, fnr_lo, delta)),
    }


@functools.lru_cache(maxsize=32)
def ideal_eps_lb(
    noise_multiplier: float,
    per_side: int,
    delta: float,
    *,
    sample_rate: float = 1.0,
    confidence: float = 0.95,
    repeats: int = 100,
    seed: int = 0,
) -> float:
    """Median eps_lb that a perfect Gaussian mechanism (canary shift C, noise sigma C, the
    canary present with probability ``sample_rate``) reaches with ``per_side`` trials on
    each side and the same selection / evaluation procedure."""
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(repeats):
        outside = rng.normal(0.0, noise_multiplier, per_side)
        present = rng.random(per_side) < sample_rate
        inside = rng.normal(0.0, noise_multiplier, per_side) + present
        found.append(evaluate_threshold(inside, outside, delta, confidence)["eps_lb"])
    return float(np.median(found))


# ---- the runs -----------------------------------------------------------------------------
def _audit_data(canary_norm: float, max_grad_norm: float, seed: int):
    """(model, dataset with the canary, dataset with a zero sample instead, unit direction u
    of the canary's clipped gradient in the flattened parameters)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(N_FEATURES, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=generator))
    x = torch.randn(N_BASE, N_FEATURES, generator=generator)
    x[:, -1] = 0.0  # the canary's feature: others' gradients are orthogonal to u
    y = torch.randint(0, 2, (N_BASE, 1), generator=generator).float() * 2 - 1
    canary_x = torch.zeros(1, N_FEATURES)
    canary_x[0, -1] = canary_norm * max_grad_norm  # loss -y <w, x>: gradient -y x
    canary_y = torch.ones(1, 1)
    with_canary = TensorDataset(torch.cat([x, canary_x]), torch.cat([y, canary_y]))
    without = TensorDataset(torch.cat([x, torch.zeros_like(canary_x)]), torch.cat([y, canary_y]))
    reference = copy.deepcopy(model).double()
    _loss(reference(canary_x.double()), canary_y.double()).backward()
    direction = torch.cat([p.grad.flatten() for p in reference.parameters()])
    return model, with_canary, without, (direction / direction.norm()).float()


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed linear loss -<y, f(x)>: a sample's gradient is -y x, whatever the weights."""
    return -(target * output).sum()


def _one_step(
    model: nn.Module,
    dataset: TensorDataset,
    setting: AuditSetting,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    accountant: str,
):
    """One fresh private run of one logical step; returns (parameter update, engine)."""
    import fastdp

    model = copy.deepcopy(model)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    engine = fastdp.PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(dataset, batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        clipping=setting.clipping,
        poisson_sampling=setting.poisson_sampling,
        seed=None,
        loss_reduction="sum",
    )
    for x, y in loader:  # one step() per micro-batch the private loader yields
        _loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if optimizer.logical_step >= 1:
            break
    after = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    return before - after, engine


def empirical_epsilon(
    *,
    trials: int = 4000,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    delta: float = 1e-5,
    sample_rate: float = 0.5,
    settings: tuple[AuditSetting, ...] = SETTINGS,
    confidence: float = 0.95,
    accountant: str = "prv",
    ideal_repeats: int = 100,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> EpsilonAudit:
    """Audit every setting with ``trials`` one-step runs (half with the canary).

    ``seed`` fixes the data, the model and the canary (and the ideal's simulation); the
    noise and the Poisson samples of every run come from OS entropy (``seed=None``).
    ``progress`` is called with 1 after each run (e.g. a tqdm bar's ``update``).
    """
    if trials < 8:
        raise ValueError(f"trials must be >= 8 (4 per side, half held out), got {trials}")
    per_side = trials // 2
    results = []
    for setting in settings:
        start = time.perf_counter()
        model, with_canary, without, direction = _audit_data(
            setting.canary_norm, max_grad_norm, seed
        )
        n = len(with_canary)
        batch_size = max(1, round(sample_rate * n)) if setting.poisson_sampling else n
        q = min(1.0, batch_size / n)
        run = dict(
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            batch_size=batch_size,
            accountant=accountant,
        )
        stats = {True: np.empty(per_side), False: np.empty(per_side)}
        engine = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poisson_sampling=False, sigma < PRV_MIN_NOISE
            for i in range(per_side):
                for present in (True, False):
                    update, engine_i = _one_step(
                        model, with_canary if present else without, setting, **run
                    )
                    stats[present][i] = float(update @ direction.double()) / max_grad_norm
                    engine = engine if engine is not None else engine_i
                    if progress is not None:
                        progress(1)
            eps_claimed = _claimed(engine, setting, noise_multiplier, q, delta, accountant)
        found = evaluate_threshold(stats[True], stats[False], delta, confidence)
        ideal = ideal_eps_lb(
            noise_multiplier,
            per_side,
            delta,
            sample_rate=q,
            confidence=confidence,
            repeats=ideal_repeats,
            seed=seed,
        )
        detected = found["eps_lb"] > eps_claimed
        results.append(
            SettingResult(
                setting=setting.name,
                description=setting.describe(q),
                trials=2 * per_side,
                noise_multiplier=noise_multiplier,
                sample_rate=q,
                delta=delta,
                eps_claimed=eps_claimed,
                ideal_eps_lb=ideal,
                verdict=("DETECTED" if detected else "MISSED")
                if setting.control
                else ("FAIL" if detected else "PASS"),
                ok=detected == setting.control,
                seconds=time.perf_counter() - start,
                **found,
            )
        )
    return EpsilonAudit(results)


def _claimed(engine, setting: AuditSetting, sigma: float, q: float, delta: float, name: str):
    """The epsilon the engine reports for its one step; for the control (no clipping, no
    guarantee) the epsilon it would have if the canary were clipped at C."""
    if setting.control:
        from fastdp.accounting import planned_epsilon

        return planned_epsilon(sigma, q, 1, delta, name)
    return engine.get_epsilon(delta=delta)
