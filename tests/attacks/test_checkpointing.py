"""Attacks through activation checkpointing: a sample is clipped once per micro-batch, and a
recomputation in backward is matched to the forward pass it recomputes or refused.

Reentrant checkpoints run their segment under no_grad in the forward and record the layers
again in backward; fastdp labels each recomputation by hooks on the checkpoint's autograd
node and refuses a record it cannot match (docs/architecture.md, "Per forward pass";
docs/threat_model.md, "The loop rules"). Each test here either is refused with the cause
named, or matches the single-sample oracle / keeps the canary's contribution at C.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from canary import (
    BACKPROPAGATED_TWICE,
    KAPPA,
    MIXED_GRAD_MODES,
    NOT_BATCH_FIRST,
    UNMATCHED_RECOMPUTE,
    C,
    D,
    U,
    norm,
)
from canary import moved as _moved
from canary import private as _private
from canary import snapshot as _snapshot
from oracle import assert_close_sums, fastdp_grad_sum, oracle_grad_sum, per_sample_loss
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdp.probe import ProbeRefusal


def _canary_batch(n: int = 2):
    """Row 0: the canary (x = e0, target -5u: gradient 10 u e0^T, norm 10 C); the other rows
    honest (target 0 = output: zero gradient)."""
    x = torch.zeros(n, D)
    x[:, 0] = 1.0
    y = torch.zeros(n, D)
    y[0] = -5.0 * U
    return x, y


class _Zero(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.zero_()


# ---- one clip per sample across the segments' backward passes ---------------------------------
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
    """A large-gradient sample, clipped per segment, would enter the sum at sqrt(k + 1) C;
    clipped once at step(), its contribution is C."""
    torch.manual_seed(2)
    x, y = torch.randn(1, 6) * 100, torch.randn(1, 2) * 100
    got = fastdp_grad_sum(_Blocks(use_reentrant=True), x, y, "flat", 1.0)
    assert norm(got) <= 1.0 + 1e-4


def test_inplace_residual_after_tapped_layer_is_exact():
    torch.manual_seed(3)
    x, y = torch.randn(5, 6), torch.randn(5, 2)
    model = _Blocks(use_reentrant=False, residual_inplace=True)
    model.train()
    expected = oracle_grad_sum(model, x, y, "flat", 0.5)
    got = fastdp_grad_sum(model, x, y, "flat", 0.5)
    assert_close_sums(got, expected)


# ---- the probe also runs when every trainable layer is checkpointed ---------------------------
class _CheckpointedSeqFirst(nn.Module):
    """The LoRA recipe's shape: every trainable layer inside a reentrant checkpoint (frozen
    embedding / head outside, enable_input_require_grads), and a layer fed sequence-first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def block(self, x):  # (B, T, d) -> (T, B, d) through the layer
        return self.lin(x.transpose(0, 1)).transpose(0, 1)

    def forward(self, x):
        x = x.detach().requires_grad_()  # what enable_input_require_grads does
        return checkpoint(self.block, x, use_reentrant=True).sum(1)


def test_reentrant_checkpoint_of_all_trainable_layers_is_probed():
    """Under reentrant checkpointing the first forward runs every segment under no_grad, so
    with all trainable layers checkpointed (LoRA) no handled layer runs with autograd on in
    the forward; the probe must still run. A sequence-first layer with T == B would mix
    samples in each per-'sample' (per-position) gradient: unprobed, replacing one sample
    moved the clipped sum by 3.80 C (replace-one bound: 2 C)."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 4, 4), torch.randn(4, 4)  # T == B == 4
    x[0] *= 1000
    y[0] *= 1000
    with pytest.raises(ProbeRefusal, match=rf"'lin' \(Linear\) {NOT_BATCH_FIRST}"):
        fastdp_grad_sum(_CheckpointedSeqFirst(), x, y, "flat", 1.0)


# ---- a no-grad root forward between a forward and its backward --------------------------------
class NonReentrantReuse(_Zero):
    """A layer used twice inside a non-reentrant checkpoint; ``skip`` (an evaluation path)
    does not call it."""

    def body(self, x):
        return self.lin(x) + self.lin(x)

    def forward(self, x, skip: bool = False):
        if skip:
            return x
        return checkpoint(self.body, x, use_reentrant=False)


@pytest.mark.parametrize("skip", [False, True])
def test_no_grad_forward_between_forward_and_backward_keeps_replays_apart(skip):
    """An evaluation forward under no_grad between a training forward and its backward must
    not make the non-reentrant replay look like a fresh call: the replay's record is in the
    recomputed graph and never receives G, the original records (pass 1) are merged, and
    the canary moves the weights by exactly C."""
    x, y = _canary_batch()
    model, optimizer, loader = _private(NonReentrantReuse(), x, y)
    before = _snapshot(model)
    for inputs, targets in loader:
        out = model(inputs)
        with torch.no_grad():
            model(inputs, skip=skip)
        per_sample_loss(out, targets).sum().backward()
        optimizer.step()
    moved = _moved(model, before)
    assert abs(moved - C) <= C * KAPPA, f"canary moved the weights by {moved:.4f} C"


# ---- a retained graph backpropagated again in the next micro-batch ----------------------------
class CheckpointedLin(_Zero):
    """One linear layer inside a reentrant activation checkpoint."""

    def forward(self, x):
        return checkpoint(self.lin, x, use_reentrant=True)


def test_reentrant_checkpoint_graph_backpropagated_in_two_micro_batches_is_refused():
    """A reentrant checkpoint's backward RECOMPUTES its segment, building fresh records on
    every backward of a retained graph. Micro-batch 1 backward(retain_graph=True), step();
    micro-batch 2: micro-batch 1's loss backward again, step(): accepted, the canary of
    micro-batch 1 is clipped and added twice in one logical batch (2 C)."""
    x, y = _canary_batch(4)
    model, optimizer, loader = _private(CheckpointedLin(), x, y, max_physical_batch_size=2)
    before = _snapshot(model)
    first = None
    with pytest.raises(RuntimeError, match=BACKPROPAGATED_TWICE):
        for inputs, targets in loader:
            if first is None:
                inputs = inputs.clone().requires_grad_(True)
                first = per_sample_loss(model(inputs), targets).sum()
                first.backward(retain_graph=True)
            else:
                first.backward()
            optimizer.step()
    assert _moved(model, before) == 0.0


class Holder:
    """A model output that is neither a tensor, tuple, list nor dict: no tensor in it, so
    no checkpoint node is reached from the output and none is tagged."""

    def __init__(self, logits):
        self.logits = logits


class CheckpointedMaybeWrapped(_Zero):
    def forward(self, x, wrap: bool = False):
        h = checkpoint(self.lin, x, use_reentrant=True)
        return Holder(h) if wrap else h


def test_failed_checkpoint_backward_leaves_no_stale_recompute_label():
    """A tagged checkpoint node whose backward raises (torch.autograd.grad is incompatible
    with reentrant checkpointing: a PGD / gradient-penalty step, caught and skipped by the
    loop) never runs its post hook. A stale label would then be taken by every later record
    made in backward outside a tagged checkpoint: a forward whose output hides its tensors,
    backpropagated with retain_graph in micro-batch 1 and again in micro-batch 2, would have
    the canary clipped and added twice (2 C). Such records are refused."""
    x, y = _canary_batch(4)
    model, optimizer, loader = _private(CheckpointedMaybeWrapped(), x, y, max_physical_batch_size=2)
    before = _snapshot(model)
    first = None
    with pytest.raises(RuntimeError, match=UNMATCHED_RECOMPUTE):
        for inputs, targets in loader:
            if first is None:
                x_adv = inputs.clone().requires_grad_(True)
                # the input-gradient step: refused by torch inside the checkpoint node
                with pytest.raises(RuntimeError, match=r"checkpoint is incompatible with \.grad"):
                    torch.autograd.grad(per_sample_loss(model(x_adv), targets).sum(), x_adv)
                inputs = inputs.clone().requires_grad_(True)
                first = per_sample_loss(model(inputs, wrap=True).logits, targets).sum()
                first.backward(retain_graph=True)
            else:
                first.backward()
            optimizer.step()
    assert _moved(model, before) == 0.0


# ---- nested checkpoints of both kinds, and an untagged auxiliary checkpoint -------------------
class Nested(nn.Module):
    """``pre``, then an outer checkpoint around (a, inner checkpoint around b, c), kinds
    None (no checkpoint) / reentrant / non-reentrant; ``reuse`` calls ``a`` a second time."""

    def __init__(self, outer, inner, reuse):
        super().__init__()
        self.pre, self.a, self.b, self.c = (nn.Linear(4, 4) for _ in range(4))
        self.outer, self.inner, self.reuse = outer, inner, reuse

    def _inner(self, h):
        return self.b(torch.tanh(h))

    def _segment(self, x):
        h = self.a(x)
        h = (
            self._inner(h)
            if self.inner is None
            else checkpoint(self._inner, h, use_reentrant=self.inner)
        )
        out = self.c(torch.tanh(h))
        return out + self.a(h) if self.reuse else out

    def forward(self, x):
        x = self.pre(x)
        if self.outer is None:
            return self._segment(x)
        return checkpoint(self._segment, x, use_reentrant=self.outer)


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("inner", [None, True, False])
@pytest.mark.parametrize("outer", [True, False])
def test_nested_checkpoints_match_the_oracle_or_are_refused(outer, inner, reuse):
    """Reentrant inside non-reentrant and vice versa (the inner node is created during the
    outer recomputation, untagged, and runs nested inside the tagged outer node): the clipped
    sums equal the oracle's over two micro-batches; a layer reused inside a reentrant outer
    checkpoint (called with autograd off and on in one pass) is refused."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    model = Nested(outer, inner, reuse)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fastdp_grad_sum(model, x, y, "flat", 1.0, micro_batch=3)

    if reuse and outer is True:
        with pytest.raises(RuntimeError, match=rf"'a' \(Linear\) was {MIXED_GRAD_MODES}"):
            run()
    else:
        assert_close_sums(run(), oracle_grad_sum(model, x, y, "flat", 1.0), rtol=1e-4)


class AuxCheckpoint(_Zero):
    """An auxiliary branch in its own reentrant checkpoint, its output kept on an attribute
    (not in the model's output), so its node is not reached from the output and not tagged.
    ``aux`` keeps the output of the first call (the training pass), not of the probe's."""

    def __init__(self):
        super().__init__()
        self.aux_lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.aux_lin.weight.zero_()
        self.aux = []

    def forward(self, x):
        self.aux.append(checkpoint(self.aux_lin, x, use_reentrant=True))
        return checkpoint(self.lin, x, use_reentrant=True)


def test_untagged_auxiliary_checkpoint_is_refused():
    """The auxiliary checkpoint's recomputed records have no label (no tagged node is running)
    and are refused, whichever node autograd runs first; nothing reaches the sums."""
    x, y = _canary_batch(4)
    model = AuxCheckpoint()
    private_model, optimizer, loader = _private(model, x, y)
    before = _snapshot(private_model)
    with pytest.raises(RuntimeError, match=UNMATCHED_RECOMPUTE):
        for inputs, targets in loader:
            inputs = inputs.clone().requires_grad_(True)
            out = private_model(inputs)
            aux = model.aux[0]  # the training pass's graph (the probe's passes come after)
            loss = per_sample_loss(out, targets).sum() + per_sample_loss(aux, targets).sum()
            loss.backward()
            optimizer.step()
    assert _moved(private_model, before) == 0.0
