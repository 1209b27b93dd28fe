"""Attacks through the training loop: one forward pass per micro-batch, every gradient of a
micro-batch from that pass, no reads of the sums inside backward, one ``step()`` per
micro-batch, and every step accounted at the rate it was sampled with.

What breaks these rules is refused, naming the cause (docs/threat_model.md, "The loop
rules"); a loop that keeps them keeps each sample's contribution at C.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from canary import IN_BACKWARD, OUTSIDE_FORWARD, SECOND_PASS, D, U
from canary import make as _make
from canary import moved as _moved
from canary import private as _private
from canary import snapshot as _snapshot
from oracle import per_sample_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp


# ---- one sample, one clip: extra steps, extra backwards, extra forwards ------------------------
def test_extra_step_inside_a_logical_batch_does_not_count_a_micro_batch_twice():
    """Two augmented views with optimizer.step() after each, in a logical batch of 2
    micro-batches: the first step() closes micro-batch 1, and the second view's backward
    must not add micro-batch 1 a second time. Accepted as a second micro-batch, one sample
    contributed 2 C to a release whose noise is sigma C."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 6) * 100, torch.randn(2, 2) * 100
    engine, m, opt, loader = _make(
        nn.Linear(6, 2), x, y, max_physical_batch_size=1, loss_reduction="sum"
    )
    before = _snapshot(m)
    xb, yb = next(iter(loader))  # micro-batch 1 of 2: sample 0 alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the second step() closes a batch the loader did not
        per_sample_loss(m(xb), yb).sum().backward()
        opt.step()
        per_sample_loss(m(xb * 1.01), yb).sum().backward()  # the second view
        opt.step()
    assert _moved(m, before) <= 1.0 + 1e-4, "one sample entered the release twice"


def test_reading_grad_sums_between_two_backwards_is_refused():
    """optimizer.grad_sums (e.g. logging the clipped-gradient norm) closes the micro-batch's
    clipping; a second forward + backward on the same micro-batch after it would add the
    sample clipped twice (2 C)."""
    torch.manual_seed(0)
    x, y = torch.randn(1, 6) * 100, torch.randn(1, 2) * 100
    engine, m, opt, loader = _make(nn.Linear(6, 2), x, y, loss_reduction="sum")
    for xb, yb in loader:
        per_sample_loss(m(xb), yb).sum().backward()
        _ = opt.grad_sums  # e.g. for logging
        with pytest.raises(RuntimeError, match=SECOND_PASS):
            per_sample_loss(m(xb * 1.01), yb).sum().backward()


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
    with pytest.raises(RuntimeError, match=SECOND_PASS):
        per_sample_loss(m(xb + 0.1), yb).sum().backward()
    with pytest.raises(RuntimeError, match="discard_logical_batch"):
        opt.step()


V = 4


class TwoTowers(nn.Module):
    """Two towers whose only trainable layers are their embeddings. ``tied``: the two
    nn.Embedding modules hold one weight (T5's encoder / decoder embeddings)."""

    def __init__(self, tied: bool):
        super().__init__()
        self.enc = nn.Embedding(V, D)
        self.dec = nn.Embedding(V, D)
        with torch.no_grad():
            self.enc.weight.zero_()
            self.dec.weight.zero_()
        if tied:
            self.dec.weight = self.enc.weight

    def forward(self, x, tower: int = 0):
        return (self.enc if tower == 0 else self.dec)(x).sum(1)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "disjoint"])
def test_two_forward_backward_passes_in_one_micro_batch_are_refused(tied):
    """One micro-batch, two forward/backward passes (one per tower, e.g. to save memory), the
    second on the rows in another order. Accepted, the records of the two passes would be
    one clipping unit row by row although row i holds different samples (tied: the canary
    clipped in two units onto one weight row, 2 C), or the canary clipped once per tower
    (disjoint: sqrt(2) C)."""
    x = torch.tensor([[1], [2]])  # row 0: the canary (gradient 10 u); row 1: zero gradient
    y = torch.stack([-5.0 * U, torch.zeros(D)])
    model, optimizer, loader = _private(TwoTowers(tied), x, y)
    for inputs, targets in loader:
        per_sample_loss(model(inputs, 0), targets).sum().backward()
        with pytest.raises(RuntimeError, match=rf"'dec' received the gradient of a {SECOND_PASS}"):
            per_sample_loss(model(inputs.flip(0), 1), targets.flip(0)).sum().backward()


class CheckpointedTied(nn.Module):
    """Two nn.Embedding modules holding one weight, the whole model inside one reentrant
    activation checkpoint (every record is made in backward, by the recomputation)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Embedding(V, D)
        self.dec = nn.Embedding(V, D)
        with torch.no_grad():
            self.enc.weight.zero_()
        self.dec.weight = self.enc.weight

    def body(self, ids, dummy):
        return self.enc(ids).sum(1) + self.dec(ids).sum(1) + 0.0 * dummy

    def forward(self, ids):
        from torch.utils.checkpoint import checkpoint

        dummy = torch.zeros(ids.shape[0], D, requires_grad=torch.is_grad_enabled())
        return checkpoint(self.body, ids, dummy, use_reentrant=True)


def test_forward_before_step_and_backward_after_it_is_refused():
    """Two micro-batches of one logical batch: micro-batch 1's forward, its step() (nothing
    recorded yet), micro-batch 2's forward, ONE backward of both losses. Accepted, the
    records of both micro-batches (all made in backward) would be merged row by row: the
    canary of micro-batch 1 and an honest sample of micro-batch 2 in one clip unit (1.8 C)."""
    torch.manual_seed(0)
    x = torch.tensor([[1], [2], [1], [2]])
    y = torch.zeros(4, D)
    y[0] = -2.5 * U
    y[2] = 0.2 * U
    model, optimizer, loader = _private(CheckpointedTied(), x, y, max_physical_batch_size=2)
    pending = None
    with pytest.raises(RuntimeError, match=SECOND_PASS):
        for inputs, targets in loader:
            loss = per_sample_loss(model(inputs), targets).sum()
            if pending is None:
                pending = loss
                optimizer.step()  # micro-batch 1 "done" (its backward comes later)
            else:
                (pending + loss).backward()
                optimizer.step()


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False)
        self.b = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(1.0)
            self.b.weight.fill_(1.0)

    def forward(self, x):
        h = self.a(x)
        if h.requires_grad:  # the training pass (not the batch-axis probe)
            self.hidden = h
        return self.b(h)


def test_grad_sums_read_inside_backward_is_refused():
    """optimizer.grad_sums read from a backward hook (logging, a gradient-accumulation
    callback) would clip layer b's records half-way through the backward and layer a's as a
    new unit at step(): sqrt(2) C."""
    x = torch.tensor([[10.0], [0.0]])
    y = torch.tensor([[-10.0], [0.0]])  # canary: both layers' gradients 400; honest: zero
    model, optimizer, loader = _private(Chain(), x, y)
    for inputs, targets in loader:
        out = model(inputs)
        model.hidden.register_hook(lambda g: optimizer.grad_sums and None)
        with pytest.raises(RuntimeError, match=IN_BACKWARD):
            per_sample_loss(out, targets).sum().backward()


# ---- every layer call inside the private model's forward --------------------------------------
def test_calling_submodules_directly_is_refused():
    """The buffer guard and the batch-axis probe run around the root module's forward. A
    loop that calls the private model's submodules (`model.b(model.bn(model.a(x)))`) would
    skip them: after model.train() puts a frozen, eval'd BatchNorm back in training mode,
    the step would write running_mean from the data without noise."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.bn = nn.BatchNorm1d(4).requires_grad_(False).eval()
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.bn(self.a(x)))

    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    net = Net()
    engine, m, opt, loader = _make(net, x, y)
    m.train()
    stats = net.bn.running_mean.clone()
    with pytest.raises(
        RuntimeError, match=rf"'a' \(Linear\) was called with autograd on {OUTSIDE_FORWARD}"
    ):
        for xb, yb in loader:
            per_sample_loss(m.b(m.bn(m.a(xb))), yb).sum().backward()
            opt.step()
    assert torch.equal(stats, net.bn.running_mean), "BatchNorm statistics of the batch released"
    assert int(net.bn.num_batches_tracked) == 0


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.zero_()

    def forward(self, x):
        return self.lin(x)


def test_layer_calls_after_a_root_forward_that_raised_are_refused():
    """A root forward that raises (here fastdp's own batch-size check on a malformed batch,
    caught by a loop that skips bad batches) must not leave the pass open: two later calls
    of ``forward`` from outside the root (no hooks), the second on the batch in another
    order, would be one reused layer of one pass merged row-wise, the canary in two clip
    units."""
    x = torch.zeros(2, D)
    x[:, 0] = 1.0
    y = torch.zeros(2, D)
    y[0] = -5.0 * U
    model, optimizer, loader = _private(Lin(), x, y)
    before = _snapshot(model)
    with pytest.raises(
        RuntimeError, match=rf"'lin' \(Linear\) was called with autograd on {OUTSIDE_FORWARD}"
    ):
        for inputs, targets in loader:
            with pytest.raises(
                ValueError, match="leading dimension of 3 but the micro-batch has 2"
            ):
                model(torch.zeros(len(inputs) + 1, D))  # a malformed batch: refused, skipped
            inner = model._module if hasattr(model, "_module") else model
            out1 = inner.forward(inputs)
            out2 = inner.forward(inputs.flip(0))
            loss = per_sample_loss(out1, targets).sum()
            loss = loss + per_sample_loss(out2, targets.flip(0)).sum()
            loss.backward()
            optimizer.step()
    assert _moved(model, before) == 0.0


# ---- steps the private loader did not draw ----------------------------------------------------
def test_steps_outside_the_private_loader_are_accounted_without_amplification():
    torch.manual_seed(5)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    engine, m, opt, loader = _make(
        nn.Linear(6, 2), x, y, noise_multiplier=1.0, poisson_sampling=True, batch_size=8
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


def test_abandoned_private_batch_does_not_make_a_foreign_step_count_as_sampled():
    """`next(iter(private_loader))` (peeking at a batch) or breaking out of the loop before
    step() leaves the loader's signal pending; the next step() on the user's own DataLoader
    must still be accounted at q = 1, not at the Poisson rate 1/8 (seed 22 makes the peeked
    Poisson batch the same size, 8)."""
    torch.manual_seed(5)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    engine, m, opt, loader = _make(
        nn.Linear(6, 2), x, y, noise_multiplier=1.0, poisson_sampling=True, batch_size=8,
        seed=22,
    )  # fmt: skip
    peek, _ = next(iter(loader))
    assert len(peek) == 8
    original = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    with pytest.warns(UserWarning, match="sample rate 1"):
        for xb, yb in original:  # the user's own loader
            per_sample_loss(m(xb), yb).sum().backward()
            opt.step()
            break
    assert engine.accountant.history[-1][1] == 1.0, engine.accountant.history
