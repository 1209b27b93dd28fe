"""Attacks of a fifth adversarial review, against d0e5370 + f0480ed (reused layers merged at
step, one forward pass per micro-batch, reentrant vs non-reentrant recomputation, T5's batched
relative bias, DoRA). Each attack test FAILS on the code it was written against when it leaks
(measured contribution / C in its docstring) and passes once the leak is refused or bounded.

Measurement (as in tests/test_attacks_round4.py): noise off, SGD lr = 1, loss summed, weights
start at zero, every honest sample has a zero gradient, so how far the weights move is the
canary's whole contribution to the released sum; it must stay <= C (1 + 2^-10).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from canary import KAPPA, REFUSED, C, D, U
from canary import check as _check
from canary import moved as _moved
from canary import private as _private
from canary import snapshot as _snapshot
from oracle import per_sample_loss
from torch import nn


class Lin(nn.Module):
    """One bias-free linear layer, zero weights: out = W x."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.zero_()

    def forward(self, x):
        return self.lin(x)


def _canary_batch(n: int = 2):
    """Row 0: the canary (x = e0, target -5u: gradient 10 u e0^T, norm 10 C); the other rows
    honest (target 0 = output: zero gradient)."""
    x = torch.zeros(n, D)
    x[:, 0] = 1.0
    y = torch.zeros(n, D)
    y[0] = -5.0 * U
    return x, y


# ---- 1. the root-pass flag left set by a forward that raised ---------------------------------
def test_root_forward_that_raised_leaves_submodule_calls_allowed_and_merged():
    """Tape._start_pass sets ``_in_root_pass`` and only the root's forward hook clears it: a
    root forward that raises (here the tape's own batch-size check on a malformed batch,
    caught by the loop, 'skip bad batches') leaves it set. Afterwards the layers accept
    calls with autograd on from outside the root's forward (model.forward(...) directly,
    no hooks): no new pass id, ``_pass_calls`` not cleared, no probe, no buffer guard. Two
    such calls, the second on the batch in another order, are counted as one reused layer
    of one pass and merged ROW-WISE: row i = call-1 sample i + call-2 sample B-1-i, so the
    canary is in two clip units."""
    model = Lin()
    x, y = _canary_batch()
    model, optimizer, loader = _private(model, x, y)
    before = _snapshot(model)
    try:
        for inputs, targets in loader:
            try:
                model(torch.zeros(len(inputs) + 1, D))  # a malformed batch: refused, skipped
            except REFUSED:
                pass
            inner = model._module if hasattr(model, "_module") else model
            out1 = inner.forward(inputs)
            out2 = inner.forward(inputs.flip(0))
            loss = per_sample_loss(out1, targets).sum()
            loss = loss + per_sample_loss(out2, targets.flip(0)).sum()
            loss.backward()
            optimizer.step()
    except REFUSED:
        return
    _check(_moved(model, before))


# ---- 2. a forward of micro-batch 1 backpropagated after micro-batch 1's step() ----------------
class CheckpointedTied(nn.Module):
    """Two nn.Embedding modules holding one weight (T5's encoder / decoder embeddings), the
    whole model inside one reentrant activation checkpoint (every record is made in backward,
    by the recomputation). ``dummy`` only gives the checkpoint a float input with grad."""

    V = 4

    def __init__(self):
        super().__init__()
        self.enc = nn.Embedding(self.V, D)
        self.dec = nn.Embedding(self.V, D)
        with torch.no_grad():
            self.enc.weight.zero_()
        self.dec.weight = self.enc.weight

    def body(self, ids, dummy):
        return self.enc(ids).sum(1) + self.dec(ids).sum(1) + 0.0 * dummy

    def forward(self, ids):
        from torch.utils.checkpoint import checkpoint

        dummy = torch.zeros(ids.shape[0], D, requires_grad=torch.is_grad_enabled())
        return checkpoint(self.body, ids, dummy, use_reentrant=True)


def _forward_then_step_then_backward(canary: bool) -> torch.Tensor:
    """Two micro-batches of one logical batch (max_physical_batch_size=2): micro-batch 1's
    forward, its step() (nothing recorded yet), micro-batch 2's forward, ONE backward of
    both losses, step(). At W = 0 a sample's gradient is -4 y on its token's row.
    Micro-batch 1 row 0: the canary (token 1, y = -2.5 u: gradient 10 u) or, in the
    neighbouring dataset, a zero-gradient sample; micro-batch 2 row 0: an honest sample
    (token 1, gradient -0.8 u, norm 0.8 < C: unclipped); other rows zero-gradient."""
    torch.manual_seed(0)
    model = CheckpointedTied()
    x = torch.tensor([[1], [2], [1], [2]])
    y = torch.zeros(4, D)
    if canary:
        y[0] = -2.5 * U
    y[2] = 0.2 * U
    model, optimizer, loader = _private(model, x, y, max_physical_batch_size=2)
    pending = None
    for inputs, targets in loader:
        loss = per_sample_loss(model(inputs), targets).sum()
        if pending is None:
            pending = loss
            optimizer.step()  # micro-batch 1 "done" (its backward comes later)
        else:
            (pending + loss).backward()
            optimizer.step()
    return model.enc.weight.detach().double().clone()


def test_forward_before_step_backward_after_mixes_two_micro_batches_in_one_clip_unit():
    """close_micro_batch resets ``_grad_passes``, the count of grad-enabled root forwards
    that lets a record made in backward (reentrant recomputation, pass_id None) take the
    current pass id. A forward of micro-batch 1 run before micro-batch 1's step() and
    backpropagated with micro-batch 2's loss after it is forgotten: every record (all made
    in backward) is labelled with pass 2, the embeddings share a weight (records deferred
    and merged per tie group) so the 'called again after clipped' refusal does not fire,
    and tape.finish merges the four records ROW-WISE: micro-batch 1's row 0 (the canary)
    and micro-batch 2's row 0 (an honest sample) are one clip unit. With the canary:
    clip(10u - 0.8u) = +C u; without (canary replaced by a zero-gradient sample): -0.8 u.
    Contribution 1.8 C."""
    try:
        with_canary = _forward_then_step_then_backward(True)
        without = _forward_then_step_then_backward(False)
    except REFUSED:
        return
    moved = float((with_canary - without).norm())
    _check(moved)


# ---- 3. the batch-axis probe run on a micro-batch of one sample ------------------------------
class Centred(Lin):
    """A batch statistic in plain tensor code: the probe's own example (x - x.mean(0))."""

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True))


def test_probe_on_a_one_sample_batch_proves_nothing_and_is_not_repeated():
    """BatchAxisProbe probes once per input signature, and the signature blanks the batch
    size. When the first batch of a signature has ONE sample (a Poisson micro-batch of 1, or
    the user's first batch), every probe row is that sample (index = (arange + 1) % 1 = 0)
    and the 'alone' pass is skipped: a model that mixes samples (x - x.mean(0)) passes, the
    signature is marked probed, and no later batch is probed. Then, in a batch of the canary
    c and an honest h with targets -y and +y, the centred inputs are +-(x_c - x_h)/2: BOTH
    samples' gradients point the canary's way (each clipped to C), and without the canary
    the honest sample alone has a zero centred input (zero gradient). Contribution: 2 C."""
    model = Centred()
    x0 = torch.zeros(1, D)
    y0 = torch.zeros(1, D)
    model, optimizer, loader = _private(model, x0, y0)
    try:
        for inputs, targets in loader:  # the first step: one zero-gradient sample
            per_sample_loss(model(inputs), targets).sum().backward()
            optimizer.step()
        before = _snapshot(model)
        x = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        y = torch.stack([-5.0 * U, 5.0 * U])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_sample_loss(model(x), y).sum().backward()  # the user's own batch
            optimizer.step()
    except REFUSED:
        return
    # without the canary: the honest sample alone, centred input 0, gradient 0: no move
    _check(_moved(model, before))


# ---- held: a no-grad root forward between a forward and its backward ---------------------------
class NonReentrantReuse(nn.Module):
    """A layer used twice inside a non-reentrant checkpoint; ``skip`` (an evaluation path)
    does not call it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.zero_()

    def body(self, x):
        return self.lin(x) + self.lin(x)

    def forward(self, x, skip: bool = False):
        from torch.utils.checkpoint import checkpoint

        if skip:
            return x
        return checkpoint(self.body, x, use_reentrant=False)


@pytest.mark.parametrize("skip", [False, True])
def test_held_no_grad_forward_between_forward_and_backward_keeps_replays_apart(skip):
    """_start_pass clears ``_awaiting_backward`` and ``_no_grad_calls``: an evaluation
    forward under no_grad between a training forward and its backward makes the
    non-reentrant replay look like a fresh call (awaiting 0). Held: the replay's record is
    in the recomputed graph and never receives G, the original records (pass 1) are merged,
    or the ambiguity is refused; the canary moves the weights by exactly C."""
    model = NonReentrantReuse()
    x, y = _canary_batch()
    model, optimizer, loader = _private(model, x, y)
    before = _snapshot(model)
    try:
        for inputs, targets in loader:
            out = model(inputs)
            with torch.no_grad():
                model(inputs, skip=skip)
            per_sample_loss(out, targets).sum().backward()
            optimizer.step()
    except REFUSED:
        return
    moved = _moved(model, before)
    assert abs(moved - C) <= C * KAPPA, f"canary moved the weights by {moved:.4f} C"


# ---- 4. a reentrant checkpoint's graph backpropagated again in the next micro-batch -----------
class CheckpointedLin(nn.Module):
    """One linear layer inside a reentrant activation checkpoint."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.zero_()

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.lin, x, use_reentrant=True)


def test_reentrant_checkpoint_graph_backpropagated_in_two_micro_batches_counts_twice():
    """The 'second backward through a layer' refusal lives in the _Tap's ctx (record set to
    None after its G): a reentrant checkpoint's backward RECOMPUTES its segment, so every
    backward of a retained graph builds fresh _Taps with fresh records. The check that
    catches it within a micro-batch is ``_recorded``; but close_micro_batch clears it and
    resets ``_grad_passes`` to 0, so in the next micro-batch of the same logical batch
    (max_physical_batch_size) the recomputed records of the OLD graph are labelled with the
    current pass and accepted. Loop: micro-batch 1 backward(retain_graph=True), step();
    micro-batch 2: micro-batch 1's loss backward again, step(): the canary of micro-batch 1
    is clipped and added twice in one logical batch. Measured: 2 C."""
    model = CheckpointedLin()
    x, y = _canary_batch(4)
    model, optimizer, loader = _private(model, x, y, max_physical_batch_size=2)
    before = _snapshot(model)
    first = None
    try:
        for inputs, targets in loader:
            if first is None:
                inputs = inputs.clone().requires_grad_(True)
                first = per_sample_loss(model(inputs), targets).sum()
                first.backward(retain_graph=True)
            else:
                first.backward()
            optimizer.step()
    except REFUSED:
        return
    _check(_moved(model, before))
