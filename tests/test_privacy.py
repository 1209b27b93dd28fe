"""Attacks on the guarantee through the training loop (design §8): each test reproduces a
leak that an earlier version had, and checks it is now refused or made exact."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from oracle import assert_close_sums, fastdp_grad_sum, oracle_grad_sum, per_sample_loss
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import fastdp


def _make(model, x, y, **kwargs):
    options = dict(noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False)
    options.update(kwargs)
    engine = fastdp.PrivacyEngine(accountant=options.pop("accountant", "rdp"))
    batch = options.pop("batch_size", len(x))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine, *engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, **options
        )


# ---- modules that mix samples or write buffers from data -----------------------------------
@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.BatchNorm1d(4, affine=False),
        lambda: nn.BatchNorm1d(4).requires_grad_(False),
        lambda: nn.InstanceNorm1d(4, track_running_stats=True),
    ],
    ids=["affine-false", "frozen", "instancenorm-running-stats"],
)
def test_batch_statistics_refused_with_or_without_parameters(norm):
    model = nn.Sequential(nn.Linear(6, 4), norm())
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"'1' \(torch\.nn\.modules\..*Norm1d\).*GroupNorm"):
        _make(model, x, y)


def test_frozen_batchnorm_in_eval_is_accepted_until_train_mode_returns():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4).requires_grad_(False), nn.Tanh())
    model[1].eval()
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    engine, m, opt, loader = _make(model, x, y)
    stats = model[1].running_mean.clone()
    for xb, yb in loader:
        per_sample_loss(m(xb), yb).sum().backward()
        opt.step()
    assert torch.equal(stats, model[1].running_mean)  # eval mode: nothing written
    m.train()  # puts the BatchNorm back in training mode
    with pytest.raises(ValueError, match=r"'1' .*BatchNorm1d.*eval\(\)"):
        m(x)
    assert torch.equal(stats, model[1].running_mean)


def test_buffer_written_from_data_in_training_forward_is_refused():
    class RunningMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)
            self.register_buffer("seen", torch.zeros(6))

        def forward(self, x):
            self.seen.mul_(0.9).add_(x.detach().mean(0), alpha=0.1)  # leaks the batch mean
            return self.lin(x)

    x, y = torch.randn(8, 6), torch.randn(8, 2)
    engine, m, opt, loader = _make(RunningMean(), x, y)
    with pytest.raises(RuntimeError, match="'seen' was written during a forward pass"):
        m(x)


# ---- activation checkpointing: one clip per sample across nested backward passes ---------
class _Blocks(nn.Module):
    def __init__(self, use_reentrant: bool, residual_inplace: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(3)
        )
        self.out = nn.Linear(8, 2).requires_grad_(False)  # frozen head, as with LoRA: the
        # first tapped layer that backward reaches is inside a checkpointed segment
        self.use_reentrant = use_reentrant
        self.residual_inplace = residual_inplace

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            if self.training and torch.is_grad_enabled():
                update = checkpoint(block, h, use_reentrant=self.use_reentrant)
            else:
                update = block(h)
            if self.residual_inplace:
                update += h  # in place on a tapped layer's output
                h = update
            else:
                h = h + update
        return self.out(h)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("mode", ["flat", "automatic", "per_layer", "none"])
def test_activation_checkpointing_matches_the_oracle(use_reentrant, mode):
    torch.manual_seed(1)
    x, y = torch.randn(6, 6) * 3, torch.randn(6, 2) * 3
    model = _Blocks(use_reentrant)
    expected = oracle_grad_sum(model, x, y, mode, 0.5)
    got = fastdp_grad_sum(model, x, y, mode, 0.5)
    assert_close_sums(got, expected)


def test_checkpointed_sample_contributes_at_most_c():
    """The attack of the reentrant case: a large-gradient sample, clipped per segment, would
    enter the sum at sqrt(k + 1) C; clipped once, its contribution is C."""
    torch.manual_seed(2)
    x, y = torch.randn(1, 6) * 100, torch.randn(1, 2) * 100
    model = _Blocks(use_reentrant=True)
    got = fastdp_grad_sum(model, x, y, "flat", 1.0)
    total = math.sqrt(sum(float(g.double().square().sum()) for g in got.values()))
    assert total <= 1.0 + 1e-4


def test_inplace_residual_after_tapped_layer_is_exact():
    torch.manual_seed(3)
    x, y = torch.randn(5, 6), torch.randn(5, 2)
    model = _Blocks(use_reentrant=False, residual_inplace=True)
    model.train()
    expected = oracle_grad_sum(model, x, y, "flat", 0.5)
    got = fastdp_grad_sum(model, x, y, "flat", 0.5)
    assert_close_sums(got, expected)


# ---- several backward passes per micro-batch -----------------------------------------------
@pytest.mark.parametrize("mode", ["flat", "per_layer"])
def test_second_backward_in_one_micro_batch_is_refused(mode):
    """Two augmented views, each with its own backward: each sample would count twice.
    (Noisy-SGD bounds nothing, so its autograd gradients simply add, as without fastdp.)"""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    engine, m, opt, loader = _make(model, x, y, clipping=mode)
    xb, yb = next(iter(loader))
    per_sample_loss(m(xb), yb).sum().backward()
    with pytest.raises(RuntimeError, match="second forward pass in one micro-batch"):
        per_sample_loss(m(xb + 0.1), yb).sum().backward()
    with pytest.raises(RuntimeError, match="discard_logical_batch"):
        opt.step()


# ---- steps that the private loader did not draw --------------------------------------------
def test_steps_outside_the_private_loader_are_accounted_without_amplification():
    torch.manual_seed(5)
    model = nn.Linear(6, 2)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    engine, m, opt, loader = _make(
        model, x, y, noise_multiplier=1.0, poisson_sampling=True, batch_size=8
    )
    for xb, yb in loader:
        per_sample_loss(m(xb), yb).sum().backward()
        opt.step()
        break
    assert engine.accountant.history[-1][1] == pytest.approx(8 / 64)
    original = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    with pytest.warns(UserWarning, match="sample rate 1"):
        for xb, yb in original:  # the user's own loader, after make_private
            per_sample_loss(m(xb), yb).sum().backward()
            opt.step()
            break
    assert engine.accountant.history[-1][1] == 1.0
    eps_q1 = engine.get_epsilon(1e-5)
    full_batch = fastdp.accounting.planned_epsilon(1.0, 1.0, 1, 1e-5, accountant="rdp")
    sampled = fastdp.accounting.planned_epsilon(1.0, 8 / 64, 2, 1e-5, accountant="rdp")
    assert eps_q1 >= full_batch > sampled  # the unsampled step costs a full-batch step


# ---- checkpoints record the run's privacy facts --------------------------------------------
@pytest.mark.parametrize(
    "change, field",
    [
        (dict(clipping="flat"), "clipping"),
        (dict(noise_multiplier=0.5), "noise_multiplier"),
        (dict(max_grad_norm=2.0), "max_grad_norm"),
        (dict(batch_size=4), "sample_rate"),
        (dict(loss_reduction="sum"), "loss_reduction"),
    ],
)
def test_checkpoint_refuses_a_run_with_other_privacy_facts(tmp_path, change, field):
    torch.manual_seed(6)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    settings = dict(clipping="none", noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8)
    engine, m, opt, loader = _make(nn.Linear(6, 2), x, y, **settings)
    for xb, yb in loader:
        per_sample_loss(m(xb), yb).mean().backward()
        opt.step()
    engine.save_checkpoint(path=tmp_path / "ck.pt", module=m, optimizer=opt)
    settings.update(change)
    other, m2, opt2, _ = _make(nn.Linear(6, 2), x, y, **settings)
    with pytest.raises(ValueError, match=rf"{field}="):
        other.load_checkpoint(path=tmp_path / "ck.pt", module=m2, optimizer=opt2)
    assert not other.accountant.history


# ---- the batch axis, whatever the shapes ---------------------------------------------------
def test_sequence_first_layer_refused_when_length_equals_batch():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.lin = nn.Linear(4, 2)

        def forward(self, x):  # x: (B, T, d) -> (T, B, d) through a layer
            h = self.norm(x.transpose(0, 1)).transpose(0, 1)
            return self.lin(h).sum(1)

    x, y = torch.randn(5, 5, 4), torch.randn(5, 2)  # T == B
    engine, m, opt, loader = _make(SeqFirst(), x, y)
    with pytest.raises(ValueError, match=r"'norm' \(LayerNorm\) is not batch-first"):
        per_sample_loss(m(x), y).sum().backward()


def test_arange_positions_refused_when_length_equals_batch():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.pos = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))  # broadcast over batch
            return self.head(h).sum(1)

    ids, y = torch.randint(0, 10, (6, 6)), torch.randn(6, 2)  # T == B
    engine, m, opt, loader = _make(Positions(), ids, y)
    with pytest.raises(ValueError, match=r"'pos' \(Embedding\) is not batch-first"):
        m(ids)


def test_probe_runs_once_per_signature_and_leaves_rng_alone():
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    engine, m, opt, loader = _make(model, x, y, batch_size=4)
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(7)
    m(x[:4])
    after_first = torch.rand(1)
    assert len(calls) == 4  # the pass and the probe's three (the batch, B' rows, one sample)
    torch.manual_seed(7)
    model.eval()
    model.train()
    m(x[:4])  # same signature: no probe, and the RNG stream is what the first pass left
    assert len(calls) == 5
    assert torch.equal(torch.rand(1), after_first)


# ---- explicit seeds ------------------------------------------------------------------------
def test_explicit_seed_warns_and_none_does_not():
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    model = nn.Linear(6, 2)
    with pytest.warns(UserWarning, match="explicit seed"):
        fastdp.PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            seed=3,
        )
    model = nn.Linear(6, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastdp.PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
