"""Attacks of a sixth adversarial review, against 851d274 (one forward pass per micro-batch,
reentrant checkpoints labelled by hooks on their autograd node, the pass closed by an
always-called hook, the probe repeated until a batch with two distinct rows).

Measurement (tests/canary.py): noise off, SGD lr = 1, loss summed, weights start at zero,
every honest sample has a zero gradient, so how far the weights move is the canary's whole
contribution to the released sum; it must stay <= C (1 + 2^-10).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from canary import REFUSED, D, U
from canary import centring_batch as _centring_batch
from canary import check as _check
from canary import moved as _moved
from canary import private as _private
from canary import snapshot as _snapshot
from oracle import per_sample_loss
from torch import nn


class CentredInTraining(nn.Module):
    """A batch statistic in plain tensor code applied in training mode only (a hand-written
    batch norm without buffers: what the probe exists to catch)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.zero_()

    def forward(self, x):
        if self.training:
            x = x - x.mean(0, keepdim=True)
        return self.lin(x)


# ---- 1. the probe's signature ignores the module's training mode ------------------------------
def test_probe_of_an_eval_mode_forward_with_grad_covers_later_training_forwards():
    """BatchAxisProbe probes the first pass with autograd on of each input signature, in the
    mode the pass ran in, and the signature is the inputs' shapes and dtypes only. A forward
    in eval mode with autograd on (PGD adversarial training crafts its examples in
    model.eval() with torch.autograd.grad on the input; or a validation pass without
    torch.no_grad()) is probed in eval mode, where the model does not mix samples, and marks
    the signature probed: the training-mode forwards that follow are never probed and centre
    over the batch. Contribution 2 C."""
    model = CentredInTraining()
    x, y = _centring_batch()
    model, optimizer, loader = _private(model, x, y)
    before = _snapshot(model)
    try:
        for inputs, targets in loader:
            # the PGD step: input gradient in eval mode (no parameter gradient recorded)
            model.eval()
            x_adv = inputs.clone().requires_grad_(True)
            loss = per_sample_loss(model(x_adv), targets).sum()
            torch.autograd.grad(loss, x_adv)
            model.train()
            per_sample_loss(model(x_adv.detach()), targets).sum().backward()
            optimizer.step()
    except REFUSED:
        return
    _check(_moved(model, before))


# ---- 2. the probe's signature ignores non-tensor arguments and tensor values ------------------
class MixOnRequest(CentredInTraining):
    """A model with an in-model mixing path switched by an argument (manifold mixup's
    ``model(x, mixup_hidden=True)``, or a mixing strength given as a 0-dim tensor that a
    schedule raises from 0); here batch centring."""

    def forward(self, x, mix=False):
        if isinstance(mix, torch.Tensor):
            return self.lin(x - mix * x.mean(0, keepdim=True))
        if mix:
            x = x - x.mean(0, keepdim=True)
        return self.lin(x)


@pytest.mark.parametrize("switch", ["bool", "tensor"])
def test_probe_signature_ignores_an_argument_that_switches_on_mixing(switch):
    """The signature is the tensors' shapes and dtypes (batch size blanked): ``model(x)`` (or
    ``model(x, torch.tensor(0.))``) probed in epoch 0 marks it, and ``model(x, mix=True)``
    (``model(x, torch.tensor(1.))``: the schedule switches in-model mixing on after warm-up)
    is never probed. Contribution 2 C."""
    model = MixOnRequest()
    x, y = _centring_batch()
    model, optimizer, loader = _private(model, x, y)
    before = _snapshot(model)
    try:
        for epoch in range(2):
            for inputs, targets in loader:
                mix = epoch > 0 if switch == "bool" else torch.tensor(float(epoch > 0))
                out = model(inputs, mix=mix)
                per_sample_loss(out, targets).sum().backward()
                optimizer.step()
            if epoch == 0:  # mixing off: the canary alone, clipped to C; start afresh
                with torch.no_grad():
                    model.lin.weight.zero_()
                before = _snapshot(model)
    except REFUSED:
        return
    _check(_moved(model, before))


# ---- 3. two distinct rows in the inputs, none where the model mixes ---------------------------
class CentredWithLabels(CentredInTraining):
    """The transformers convention: ``model(x, labels)`` returns the per-sample losses."""

    def forward(self, x, labels):
        out = self.lin(x - x.mean(0, keepdim=True))
        return per_sample_loss(out, labels)


class CentredAfterRelu(CentredInTraining):
    """A batch statistic after a nonlinearity (a hand-written batch norm after ReLU)."""

    def forward(self, x):
        h = torch.relu(x)
        return self.lin(h - h.mean(0, keepdim=True))


@pytest.mark.parametrize("where", ["labels", "relu"])
def test_probe_marks_a_batch_whose_distinct_rows_are_not_where_the_model_mixes(where):
    """The round-5 fix records a signature as probed only when ``_distinct_rows`` finds two
    different samples, but it looks at the model's INPUT tensors: any batch-first input
    tensor with two different rows will do. A first micro-batch whose rows differ only in
    the labels passed to the model (transformers' ``model(input_ids, labels=...)``; two
    samples with one input and different labels), or only where a ReLU zeroes them before
    the batch statistic, shows no mixing (every row is the same sample at the mixing site)
    yet marks the signature probed; the next micro-batch (the canary and an honest sample)
    is centred over the batch and never probed. Contribution 2 C."""
    first = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # same input, labels differ
    if where == "relu":
        first = torch.tensor([[-1.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])  # differ; equal after ReLU
    canary_x, canary_y = _centring_batch()
    x = torch.cat([first, canary_x])
    y = torch.cat([torch.stack([U, -U]), canary_y])
    model = CentredWithLabels() if where == "labels" else CentredAfterRelu()
    model, optimizer, loader = _private(model, x, y, max_physical_batch_size=2)
    before = _snapshot(model)  # the first micro-batch contributes nothing (centred rows 0)
    try:
        for inputs, targets in loader:
            if where == "labels":
                loss = model(inputs, targets).sum()
            else:
                loss = per_sample_loss(model(inputs), targets).sum()
            loss.backward()
            optimizer.step()
    except REFUSED:
        return
    _check(_moved(model, before))


# ---- 4. a stale checkpoint label after an exception inside a checkpoint's backward -------------
class Holder:
    """A model output that is neither a tensor, tuple, list nor dict (a plain dataclass-like
    object): Tape._tag_checkpoints finds no tensor in it, so no checkpoint is tagged."""

    def __init__(self, logits):
        self.logits = logits


class CheckpointedMaybeWrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.zero_()

    def forward(self, x, wrap: bool = False):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.lin, x, use_reentrant=True)
        return Holder(h) if wrap else h


def test_stale_recompute_label_after_a_failed_checkpoint_backward_labels_untagged_graphs():
    """Tape._recompute_pass is set by the prehook of a tagged checkpoint node and cleared by
    its post hook; when the node's backward raises, the post hook never runs, and only
    Tape.reset clears it (not _start_pass, not close_micro_batch). Here the node raises
    because torch.autograd.grad is incompatible with reentrant checkpointing (a PGD /
    gradient-penalty step, caught and skipped by the loop). From then on every record made in
    backward outside a tagged checkpoint takes the stale label instead of being refused: a
    forward whose output hides its tensors (a plain output object: nothing tagged, so no
    second-run refusal either) backpropagated with retain_graph in micro-batch 1 and again
    in micro-batch 2 is recomputed twice, both labelled with the stale pass and accepted:
    the canary is clipped and added twice in one logical batch. Contribution 2 C."""
    model = CheckpointedMaybeWrapped()
    x = torch.zeros(4, D)
    x[:, 0] = 1.0
    y = torch.zeros(4, D)
    y[0] = -5.0 * U  # the canary (gradient norm 10 C); the other rows zero-gradient
    model, optimizer, loader = _private(model, x, y, max_physical_batch_size=2)
    before = _snapshot(model)
    first = None
    try:
        for inputs, targets in loader:
            if first is None:
                x_adv = inputs.clone().requires_grad_(True)
                try:  # the input-gradient step: refused by torch inside the checkpoint node
                    torch.autograd.grad(per_sample_loss(model(x_adv), targets).sum(), x_adv)
                except RuntimeError:
                    pass
                inputs = inputs.clone().requires_grad_(True)
                first = per_sample_loss(model(inputs, wrap=True).logits, targets).sum()
                first.backward(retain_graph=True)
            else:
                first.backward()
            optimizer.step()
    except REFUSED:
        return
    _check(_moved(model, before))


# ---- held: nested checkpoints of both kinds, and an untagged auxiliary checkpoint -------------
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
        from torch.utils.checkpoint import checkpoint

        h = self.a(x)
        h = (
            self._inner(h)
            if self.inner is None
            else checkpoint(self._inner, h, use_reentrant=self.inner)
        )
        out = self.c(torch.tanh(h))
        return out + self.a(h) if self.reuse else out

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = self.pre(x)
        if self.outer is None:
            return self._segment(x)
        return checkpoint(self._segment, x, use_reentrant=self.outer)


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("inner", [None, True, False])
@pytest.mark.parametrize("outer", [True, False])
def test_held_nested_checkpoints_match_the_oracle_or_are_refused(outer, inner, reuse):
    """Reentrant inside non-reentrant and vice versa (the inner node is created during the
    outer recomputation, untagged, and runs nested inside the tagged outer node): the clipped
    sums equal the oracle's over two micro-batches, or the model is refused (a reused layer
    inside a reentrant checkpoint)."""
    from oracle import assert_close_sums, fastdp_grad_sum, oracle_grad_sum

    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    model = Nested(outer, inner, reuse)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fastdp_grad_sum(model, x, y, "flat", 1.0, micro_batch=3)
    except REFUSED:
        assert reuse and outer is True
        return
    assert_close_sums(got, oracle_grad_sum(model, x, y, "flat", 1.0), rtol=1e-4)


class AuxCheckpoint(CheckpointedMaybeWrapped):
    """An auxiliary branch in its own reentrant checkpoint, its output kept on an attribute
    (not in the model's output): its node is not reached by Tape._tag_checkpoints."""

    def __init__(self):
        super().__init__()
        self.aux_lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.aux_lin.weight.zero_()

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        self.aux = checkpoint(self.aux_lin, x, use_reentrant=True)
        return checkpoint(self.lin, x, use_reentrant=True)


def test_held_untagged_auxiliary_checkpoint_is_refused():
    """The auxiliary checkpoint's recomputed records have no label (no tagged node is running)
    and are refused, whichever node autograd runs first; nothing reaches the sums. (Here the
    probe's own passes overwrite ``model.aux`` with the graph of its one-sample pass, whose
    recomputation is refused by the batch-size check first: either refusal holds.)"""
    model = AuxCheckpoint()
    x, y = _canary_batch_4()
    model, optimizer, loader = _private(model, x, y)
    before = _snapshot(model)
    with pytest.raises(REFUSED):
        for inputs, targets in loader:
            inputs = inputs.clone().requires_grad_(True)
            out = model(inputs)
            loss = per_sample_loss(out, targets).sum() + per_sample_loss(model.aux, targets).sum()
            loss.backward()
            optimizer.step()
    assert _moved(model, before) == 0.0


def _canary_batch_4():
    x = torch.zeros(4, D)
    x[:, 0] = 1.0
    y = torch.zeros(4, D)
    y[0] = -5.0 * U
    return x, y
