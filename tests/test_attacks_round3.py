"""Attacks of a third adversarial review (float32 buffer accumulation across samples, the
probe under no_grad). Each test FAILS on the code it was written against (b01e0a5; measured
contribution / C in its docstring) and passes once the leak is refused or made exact.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp

REFUSED = (ValueError, RuntimeError)
KAPPA = 2.0**-10


def _clipped_sum_scalar(model, inputs, targets) -> float:
    """One logical step (flat, C = 1, sigma = 0, SGD lr = 1, loss sum) from a zero weight:
    returns the released clipped sum of the (single) weight entry [0, 0]."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = fastdp.PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, opt, loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=DataLoader(TensorDataset(inputs, targets), batch_size=len(inputs)),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            loss_reduction="sum",
            seed=0,
        )
    for xb, yb in loader:
        (m(xb) - yb).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return -float(m.weight.detach().double().flatten()[0])


def _chain_values(with_x: bool, m_exp: int, n_small: int) -> list[float]:
    """2^(m_exp+1) honest samples of +0.5 C (the float32 buffer reaches 2^m_exp), then the
    attacker's sample of -0.999 C, then n_small honest samples of 0.7 ulp(2^m_exp). Above
    2^m_exp each small add rounds UP to a full ulp; just below it (where the attacker's sample
    puts the buffer) the ulp halves and each add rounds to one (smaller) ulp. Every sample is
    benign on its own (no cancellation: magnitude == norm), so accumulation_excess adds 0."""
    small = 0.7 * 2.0 ** (m_exp - 23)
    return [0.5] * 2 ** (m_exp + 1) + ([-0.999] if with_x else []) + [small] * n_small


# ---- 1. the float32 buffer's chain of adds across samples ------------------------------------
def test_embedding_buffer_index_add_across_samples_amplifies_one_sample():
    """rules/embedding.py sums each (sample, token) in float64, then index_adds every sample's
    row into the float32 buffer one after the other; accumulation_depth counts one rounding
    (+1) for that add, but the add's error is relative to the BUFFER (the other samples'
    sum), and one sample moving the buffer across a binade changes the rounding of every
    later add. nn.Embedding(4, 1), T = 1, all ids 0: 4096 samples of 0.5, the attacker's
    -0.999, 8192 samples of 0.7 * 2^-12. Measured |sum(D') - sum(D)| / C = 1.998 (claimed
    bound 1 + 2^-10; 2^9 / 2048 small samples: 1.061)."""
    values = {}
    for with_x in (True, False):
        vals = torch.tensor(_chain_values(with_x, 11, 8192))
        ids = torch.zeros(len(vals), 1, dtype=torch.long)
        model = nn.Embedding(4, 1)
        with torch.no_grad():
            model.weight.zero_()
        try:
            values[with_x] = _clipped_sum_scalar(model, ids, (-vals / 2).reshape(-1, 1, 1))
        except REFUSED:
            return
    assert abs(values[True] - values[False]) <= 1.0 + KAPPA


def test_linear_per_call_buffer_adds_across_samples_amplify_one_sample():
    """kernels/clipped_grad.py: with T = 2048 one sample per call, each call's result is added
    into the float32 buffer (out.addmm_) in sample order: the same chain as above, for
    nn.Linear(1, 1, bias=False) on (B, 2048, 1) inputs with one nonzero token per sample:
    1024 samples of 0.5, the attacker's -0.999, 2048 samples of 0.7 * 2^-14. Measured
    contribution / C = 1.0615 (4096 / 8192 samples: 1.998)."""
    t = 2048
    values = {}
    for with_x in (True, False):
        vals = torch.tensor(_chain_values(with_x, 9, 2048))
        a = torch.zeros(len(vals), t, 1)
        a[:, 0, 0] = 1.0
        y = torch.zeros(len(vals), t, 1)
        y[:, 0, 0] = -vals / 2
        model = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        try:
            values[with_x] = _clipped_sum_scalar(model, a, y)
        except REFUSED:
            return
    assert abs(values[True] - values[False]) <= 1.0 + KAPPA


# ---- 2. the probe runs under torch.no_grad() with F.dropout patched: a model can tell -------
class _GradOnlyCentering(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if torch.is_grad_enabled():  # False in every probe pass, True in training
            x = x - x.mean(0)
        return self.lin(x)


_DROPOUT = torch.nn.functional.dropout


class _DropoutPatchDetector(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if torch.nn.functional.dropout is _DROPOUT:  # the probe swaps it for an identity
            x = x - x.mean(0)
        return self.lin(x)


def _probe_leak(model_cls) -> float | None:
    from oracle import fastdp_grad_sum

    torch.manual_seed(1)
    x, y = torch.randn(9, 4), torch.randn(9, 3)
    x[0] = 1e4
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with_it = fastdp_grad_sum(model_cls(), x, y, "flat", 1.0)
            without = fastdp_grad_sum(model_cls(), x[1:], y[1:], "flat", 1.0)
    except REFUSED:
        return None
    return math.sqrt(sum(float((with_it[k] - without[k]).double().square().sum()) for k in with_it))


def test_probe_under_no_grad_misses_grad_mode_only_mixing():
    """probe.py runs all three passes under torch.no_grad(); a forward that mixes samples only
    when grad is enabled (`if torch.is_grad_enabled(): x = x - x.mean(0)`) is identical in
    every probe pass and accepted. Adding sample 0 (1e4) to 8 others moves the clipped sum
    by 9.53 C (flat, C = 1)."""
    diff = _probe_leak(_GradOnlyCentering)
    assert diff is None or diff <= 1.0 + 1e-4


@pytest.mark.xfail(
    strict=True,
    reason="model code is trusted (design §8: the adversary chooses samples); a model written "
    "to detect the probe's dropout patch passes it (documented in fastdp/probe.py)",
)
def test_probe_detectable_through_patched_functional_dropout():
    """_no_dropout replaces torch.nn.functional.dropout for the probe; a model that compares
    it with the original mixes samples only outside the probe. 9.53 C (flat, C = 1)."""
    diff = _probe_leak(_DropoutPatchDetector)
    assert diff is None or diff <= 1.0 + 1e-4


# ---- 3. the probe runs once per input signature: a model may change after it ---------------
class _MixesFromSecondStep(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.passes = 0

    def forward(self, x):
        if torch.is_grad_enabled():
            self.passes += 1
        if self.passes > 1:  # the second training pass has the same signature: not probed
            x = x - x.mean(0)
        return self.lin(x)


def test_probe_once_per_signature_misses_mixing_that_starts_later():
    """The probe runs on the first pass of each input signature only; a model whose forward
    starts mixing samples on a later pass (a Python counter, a schedule, a flag flipped after
    warm-up) is probed while still honest. Step 1 at lr 0 (identical weights for D and D'),
    step 2 at lr 1: adding sample 0 (1e4) to 8 others moves step 2's clipped sum by 9.53 C."""

    def second_step(x, y):
        model = _MixesFromSecondStep()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        engine = fastdp.PrivacyEngine()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, opt, loader = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
                noise_multiplier=0.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                loss_reduction="sum",
                seed=0,
            )
            for step in range(2):
                for group in opt.param_groups:
                    group["lr"] = float(step)
                for xb, yb in loader:
                    before = {n: p.detach().clone() for n, p in m.named_parameters()}
                    (m(xb) - yb).square().sum().backward()
                    opt.step()
                    opt.zero_grad()
        return {n: before[n] - p.detach() for n, p in m.named_parameters()}

    torch.manual_seed(1)
    x, y = torch.randn(9, 4), torch.randn(9, 3)
    x[0] = 1e4
    try:
        with_it, without = second_step(x, y), second_step(x[1:], y[1:])
    except REFUSED:
        return
    diff = math.sqrt(sum(float((with_it[k] - without[k]).double().square().sum()) for k in with_it))
    assert diff <= 1.0 + 1e-4
