"""Attacks found by an adversarial review of the DP step.

Each test reproduces a break of design §8 / README "Privacy guarantees and threat model" on
the code it was written against, and FAILS there; it passes once the leak is either refused
(an exception naming the problem) or made exact (a sample's contribution <= C, measured
against the float64 single-sample oracle or directly on the update).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from oracle import fastdp_grad_sum, per_sample_loss
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import fastdp

REFUSED = (ValueError, RuntimeError)


def _make(model, x, y, **kwargs):
    options = dict(noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False)
    options.update(kwargs)
    engine = fastdp.PrivacyEngine(accountant=options.pop("accountant", "rdp"))
    batch = options.pop("batch_size", len(x))
    lr = options.pop("lr", 1.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine, *engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, **options
        )


def _norm(grads: dict) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


def _update_norm(model: nn.Module, before: dict) -> float:
    """||theta_before - theta_after|| (with SGD lr=1, sum reduction, sigma=0: the clipped sum)."""
    return math.sqrt(
        sum(
            float((before[n] - p.detach()).double().square().sum())
            for n, p in model.named_parameters()
            if n in before
        )
    )


def _snapshot(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- 1. a logical batch closed by an extra step() counts a micro-batch twice ----------------
def test_extra_step_inside_a_logical_batch_counts_a_micro_batch_twice():
    """Two augmented views with optimizer.step() after each (what the 'appeared twice'
    error message tells the user to do), in a logical batch of 2 micro-batches: the first
    step() only closes micro-batch 1 (not last) and clears the tape's record of which layers
    already received a backward; the second view's backward is then accepted, and the second
    step() (no loader signal pending) closes the logical batch with micro-batch 1 clipped
    twice. One sample contributes 2 C to a release whose noise is sigma C (it is accounted at
    q = 1, but with sensitivity C, not 2 C). Measured: update norm / C = 2.000."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 6) * 100, torch.randn(2, 2) * 100
    engine, m, opt, loader = _make(
        nn.Linear(6, 2), x, y, max_physical_batch_size=1, loss_reduction="sum"
    )
    before = _snapshot(m)
    xb, yb = next(iter(loader))  # micro-batch 1 of 2: sample 0 alone
    try:
        per_sample_loss(m(xb), yb).sum().backward()
        opt.step()
        per_sample_loss(m(xb * 1.01), yb).sum().backward()  # the second view
        opt.step()
    except REFUSED:
        return
    assert _update_norm(m, before) <= 1.0 + 1e-4, "one sample entered the release twice"


# ---- 2. reading grad_sums closes the micro-batch: a second backward is then accepted --------
def test_reading_grad_sums_between_two_backwards_counts_a_sample_twice():
    """optimizer.grad_sums (e.g. logging the clipped-gradient norm) calls tape.finish(),
    which clears the set of layers that already had a backward in this micro-batch; a second
    forward + backward on the same micro-batch is then not refused, and step() releases the
    sum with the sample clipped twice. One sample, flat clipping: update norm / C = 2.000."""
    torch.manual_seed(0)
    x, y = torch.randn(1, 6) * 100, torch.randn(1, 2) * 100
    engine, m, opt, loader = _make(nn.Linear(6, 2), x, y, loss_reduction="sum")
    before = _snapshot(m)
    for xb, yb in loader:
        try:
            per_sample_loss(m(xb), yb).sum().backward()
            _ = opt.grad_sums  # e.g. for logging
            per_sample_loss(m(xb * 1.01), yb).sum().backward()
            opt.step()
        except REFUSED:
            return
    assert _update_norm(m, before) <= 1.0 + 1e-4, "one sample entered the release twice"


# ---- 3. reentrant checkpointing of every trainable layer skips the batch-axis probe ---------
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


def test_reentrant_checkpoint_of_all_trainable_layers_skips_the_probe():
    """The probe runs after a training forward only if a handled layer ran with autograd on
    (tape._pass_batch); under reentrant checkpointing the first forward runs every segment
    under no_grad, so when all trainable layers are checkpointed (LoRA) no signature is ever
    probed, and in the backward's recomputation only the leading dimension is checked. A
    sequence-first layer with T == B then mixes samples in each per-'sample' (per-position)
    gradient: replacing one sample moves the clipped sum by 3.80 C (replace-one bound: 2 C)."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 4, 4), torch.randn(4, 4)  # T == B == 4
    x[0] *= 1000
    y[0] *= 1000
    model = _CheckpointedSeqFirst()
    try:
        got = fastdp_grad_sum(model, x, y, "flat", 1.0)
        x2, y2 = x.clone(), y.clone()
        x2[0], y2[0] = 0.0, 0.0  # the neighbour: sample 0 replaced
        other = fastdp_grad_sum(model, x2, y2, "flat", 1.0)
    except REFUSED:
        return
    assert _norm({k: got[k] - other[k] for k in got}) <= 2.0 + 1e-4


# ---- 4. leftover loader signal: a step on foreign data is accounted as Poisson-sampled ------
def test_abandoned_private_batch_makes_a_foreign_step_count_as_sampled():
    """`next(iter(private_loader))` (peeking at a batch) or breaking out of the loop before
    step() leaves the loader's signal (is_last=True, size) pending on the optimizer; the next
    step() taken on the user's own DataLoader consumes it and is accounted at the Poisson
    rate q = 1/8 with no warning, instead of q = 1 as README promises for steps the private
    loader did not draw (seed 22 makes the peeked Poisson batch the same size, 8)."""
    torch.manual_seed(5)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    engine, m, opt, loader = _make(
        nn.Linear(6, 2), x, y, noise_multiplier=1.0, poisson_sampling=True, batch_size=8,
        seed=22,
    )  # fmt: skip
    peek, _ = next(iter(loader))
    assert len(peek) == 8
    original = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for xb, yb in original:  # the user's own loader
                per_sample_loss(m(xb), yb).sum().backward()
                opt.step()
                break
        except REFUSED:
            return
    assert engine.accountant.history[-1][1] == 1.0, engine.accountant.history


# ---- 5. sample mixing in the forward without a BatchNorm module -----------------------------
class _FunctionalBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        # batch statistics without a module (F.batch_norm / x - x.mean(0) / in-model mixup)
        return self.lin(F.batch_norm(x, None, None, training=True))


def test_functional_batch_statistics_mix_samples_unrefused():
    """README: 'modules that mix samples ... in training mode are refused'; design §8: 'no
    mixing of samples in the forward'. Only _BatchNorm / _InstanceNorm instances are checked
    and the probe checks shapes only, so F.batch_norm(x, None, None, training=True) (or
    x - x.mean(0), or mixup inside the model) passes: one sample moves every other sample's
    clipped gradient. Adding one sample (of 9) moves the clipped sum by 4.17 C (x - x.mean(0):
    9.5 C)."""
    torch.manual_seed(1)
    x, y = torch.randn(9, 4), torch.randn(9, 3)
    x[0] = 1e4
    model = _FunctionalBatchNorm()
    try:
        with_it = fastdp_grad_sum(model, x, y, "flat", 1.0)
        without = fastdp_grad_sum(model, x[1:], y[1:], "flat", 1.0)
    except REFUSED:
        return
    assert _norm({k: with_it[k] - without[k] for k in with_it}) <= 1.0 + 1e-4


# ---- 6. state written from data that BufferGuard does not see -------------------------------
def test_frozen_embedding_with_max_norm_rewrites_the_rows_of_the_batch():
    """max_norm is refused on a trainable Embedding (it renormalises, in place and without
    noise, exactly the rows of the tokens in the batch), but not on a frozen one (a frozen
    pretrained embedding under a trainable head): the released weight reveals which tokens
    were in the batch. BufferGuard checks buffers only, not parameters."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4, max_norm=1.0).requires_grad_(False)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(self.emb(ids)).sum(1)

    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():
        model.emb.weight.mul_(10)  # every row has norm > max_norm
    weight = model.emb.weight.detach().clone()
    ids, y = torch.tensor([[3, 3], [5, 5]]), torch.randn(2, 2)
    try:
        engine, m, opt, loader = _make(model, ids, y)
        for xb, yb in loader:
            per_sample_loss(m(xb), yb).sum().backward()
            opt.step()
    except REFUSED:
        return
    changed = (model.emb.weight != weight).any(1).nonzero().flatten().tolist()
    assert changed == [], f"rows {changed} (the batch's tokens) were rewritten without noise"


def test_buffer_reassigned_in_forward_is_not_seen_by_the_guard():
    """BufferGuard compares version counters of the buffer tensors it listed at attach time;
    `self.seen = 0.9 * self.seen + 0.1 * x.mean(0)` (the common out-of-place form) puts a new
    tensor in _buffers and the old one's version never moves: the batch mean is released in
    the state_dict without clipping or noise."""

    class RunningMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)
            self.register_buffer("seen", torch.zeros(6))

        def forward(self, x):
            self.seen = 0.9 * self.seen + 0.1 * x.detach().mean(0)
            return self.lin(x)

    x, y = torch.randn(8, 6), torch.randn(8, 2)
    model = RunningMean()
    try:
        engine, m, opt, loader = _make(model, x, y)
        for xb, yb in loader:
            per_sample_loss(m(xb), yb).sum().backward()
            opt.step()
    except REFUSED:
        return
    assert torch.equal(model.seen, torch.zeros(6)), "a data statistic reached the state_dict"


def test_frozen_parameter_written_in_forward_is_not_seen_by_the_guard():
    """A frozen parameter written in place in the training forward (data-dependent init such
    as ActNorm, or a statistic kept in a requires_grad=False Parameter) is released with the
    model without noise; only buffers are guarded."""

    class Stat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)
            self.stat = nn.Parameter(torch.zeros(6), requires_grad=False)

        def forward(self, x):
            with torch.no_grad():
                self.stat.copy_(x.mean(0))
            return self.lin(x)

    x, y = torch.randn(8, 6), torch.randn(8, 2)
    model = Stat()
    try:
        engine, m, opt, loader = _make(model, x, y)
        for xb, yb in loader:
            per_sample_loss(m(xb), yb).sum().backward()
            opt.step()
    except REFUSED:
        return
    assert torch.equal(model.stat, torch.zeros(6)), "a data statistic reached the state_dict"


# ---- 7. loading an older checkpoint into a run that went further ----------------------------
def test_rollback_to_an_older_checkpoint_forgets_steps_and_reuses_their_noise(tmp_path):
    """An engine that took 4 noisy steps loads its own checkpoint of step 1 (a rollback, e.g.
    after a loss spike) and takes 3 more: 7 noisy steps ran on the data, the accountant
    reports 4, and steps 2-4 are redrawn with the very same noise (same secret, same step
    counter); with any change after the rollback (learning rate, skipped batch) the
    difference of the two releases of a step is noise-free. Refuse loading a checkpoint older
    than the engine's position (or re-key and account every step)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    engine, m, opt, loader = _make(
        nn.Linear(6, 2), x, y, noise_multiplier=1.0, poisson_sampling=True, batch_size=8,
        lr=0.1,
    )  # fmt: skip

    def steps(k):
        done = 0
        while done < k:
            for xb, yb in loader:
                per_sample_loss(m(xb), yb).mean().backward()
                opt.step()
                done += 1
                if done == k:
                    break

    steps(1)
    engine.save_checkpoint(path=tmp_path / "ck.pt", module=m, optimizer=opt)
    steps(3)
    try:
        engine.load_checkpoint(path=tmp_path / "ck.pt", module=m, optimizer=opt)
    except REFUSED:
        return
    steps(3)
    ran = fastdp.accounting.planned_epsilon(1.0, 8 / 64, 7, 1e-5, accountant="rdp")
    assert engine.get_epsilon(1e-5) >= ran - 1e-9


# ---- 8. a training loop that calls submodules skips the guard and the probe -----------------
def test_calling_submodules_directly_skips_buffer_guard_and_probe():
    """BufferGuard and the batch-axis probe hang on the root module's forward hooks. A loop
    that calls the private model's submodules (`model.b(model.bn(model.a(x)))`, common in
    multi-head / encoder-head code) never triggers them: after model.train() puts a frozen,
    eval'd BatchNorm back in training mode, the first step normalises with batch statistics
    and writes running_mean / num_batches_tracked from the data without noise (only the
    second step is stopped, by a misleading 'called twice in one forward pass')."""

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
    try:
        for xb, yb in loader:
            per_sample_loss(m.b(m.bn(m.a(xb))), yb).sum().backward()
            opt.step()
    except REFUSED:
        pass
    assert torch.equal(stats, net.bn.running_mean), "BatchNorm statistics of the batch released"
    assert int(net.bn.num_batches_tracked) == 0
