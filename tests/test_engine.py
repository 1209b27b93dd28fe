"""PrivacyEngine.make_private: the API contract, refusals, noise, NaN handling."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close_sums, oracle_grad_sum, per_sample_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp


def _private(model, n=32, batch=8, **kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(n, 6), torch.randn(n, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    options = dict(noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, seed=0)
    options.update(kwargs)
    engine = fastdp.PrivacyEngine()
    return (
        engine,
        *engine.make_private(module=model, optimizer=optimizer, data_loader=loader, **options),
    ), (x, y)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


# ---- API contract ----------------------------------------------------------------------------
def test_parameters_stay_the_users_objects_and_no_plain_weight_grad():
    model = _mlp()
    ids = [id(p) for p in model.parameters()]
    (engine, m, opt, loader), (x, y) = _private(model)
    assert m is model and [id(p) for p in m.parameters()] == ids
    assert isinstance(opt, torch.optim.Optimizer)
    per_sample_loss(m(x[:4]), y[:4]).mean().backward()
    # autograd never computed the ordinary weight gradients: the clipped GEMM replaces them
    assert all(p.grad is None for p in m.parameters())
    assert any(float(buf.abs().sum()) > 0 for buf in opt.grad_sums.values())


def test_mean_reduction_divides_by_expected_batch():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    (engine, m, opt, loader), (x, y) = _private(model, batch=8)
    xb, yb = next(iter(loader))
    per_sample_loss(m(xb), yb).mean().backward()
    opt.step()
    expected = oracle_grad_sum(_mlp(), xb, yb, "flat", 1.0)
    got = {n: (b - p.detach()) * 8 for (n, p), b in zip(m.named_parameters(), before)}
    assert_close_sums(got, expected)


def test_lr_scheduler_and_state_dict():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for xb, yb in loader:
        per_sample_loss(m(xb), yb).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5**4)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.5**4)


def test_eval_under_no_grad_uses_plain_forward():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model)
    with torch.no_grad():
        out = m(x)
    hidden = torch.tanh(F.linear(x, m[0].weight, m[0].bias))
    expected = F.linear(hidden, m[2].weight, m[2].bias).detach()
    assert torch.allclose(out, expected) and not out.requires_grad
    assert out.grad_fn is None and not opt.grad_sums and opt.tape._pass_batch is None


# ---- refusals ----------------------------------------------------------------------------------
class PosEmb(nn.Module):
    def __init__(self, broadcast: bool):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(8, 4)
        self.broadcast = broadcast

    def forward(self, idx):
        positions = torch.arange(idx.shape[1])
        if not self.broadcast:
            positions = positions.expand(idx.shape[0], -1)
        return (self.tok(idx) + self.pos(positions)).sum((1, 2))


def _make(model, **kwargs):
    loader = DataLoader(TensorDataset(torch.randn(8, 6), torch.randn(8, 2)), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    options.update(kwargs)
    return fastdp.PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, **options
    )


def test_refuses_batchnorm_naming_module_and_fix():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"'1' \(.*BatchNorm1d\).*GroupNorm"):
        _make(model)


def test_refuses_layer_without_rule():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 4)

    with pytest.raises(ValueError, match=r"'rnn' \(.*GRU\).*no per-sample rule"):
        _make(Net())


def test_refuses_parameter_without_batch_dimension():
    model = PosEmb(broadcast=True)
    m, opt, loader = _make(model)
    idx = torch.randint(0, 8, (3, 5))
    with pytest.raises(ValueError, match=r"'pos'.*expand\(B, T\)"):
        m(idx).sum().backward()


def test_expanded_positions_are_fine():
    model = PosEmb(broadcast=False)
    m, opt, loader = _make(model, noise_multiplier=0.0)
    idx = torch.randint(0, 8, (3, 5))
    m(idx).sum().backward()
    opt.step()


def test_refuses_shared_parameter_and_shared_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match=r"'0.weight', '1.weight'.*weight tying"):
        _make(model)
    layer = nn.Conv1d(4, 4, 1)  # a shared Linear is merged (tests/test_reuse.py); conv is not
    with pytest.raises(ValueError, match=r"module '1' \(Conv1d\) is the same object as '0'"):
        _make(nn.Sequential(layer, layer))


def test_refuses_reusing_a_layer_whose_rule_cannot_merge_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.conv(x.unsqueeze(-1))).flatten(1)

    m, opt, loader = _make(Twice())
    with pytest.raises(RuntimeError, match=r"'conv' \(Conv1d\) was called twice"):
        m(torch.randn(2, 4))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier must be"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be"),
        ({"max_grad_norm": -2.0}, "max_grad_norm must be"),
        ({"clipping": "elementwise"}, "unknown clipping mode 'elementwise'"),
        ({"clipping": "per_layer", "max_grad_norm": [1.0]}, "1 thresholds for 2 layers"),
        ({"loss_reduction": "max"}, "loss_reduction"),
    ],
)
def test_refuses_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _make(_mlp(), **kwargs)


def test_refuses_ddp_wrapped_module(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_mlp())
        with pytest.raises(ValueError, match="DistributedDataParallel.*unclipped"):
            _make(ddp)
    finally:
        dist.destroy_process_group()


# ---- noise ---------------------------------------------------------------------------------
def _noisy_update(seed, sigma=2.0, clip=0.5, batch=16, micro=None, width=400):
    torch.manual_seed(0)
    model = nn.Linear(width, 50)
    before = model.weight.detach().clone()
    x, y = torch.randn(batch, width), torch.randn(batch, 50)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = fastdp.PrivacyEngine()
    m, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        poisson_sampling=False,
        max_physical_batch_size=micro,
        seed=seed,
    )
    for xb, yb in loader:
        per_sample_loss(m(xb), yb).mean().backward()
        opt.step()
        opt.zero_grad()
    return before - model.weight.detach()


def test_noise_std_is_sigma_c_over_b_once_per_logical_batch():
    sigma, clip, batch = 2.0, 0.5, 16
    for micro in (None, 4):  # one physical batch, or four micro-batches: noise added once
        noisy = _noisy_update(seed=7, sigma=sigma, clip=clip, batch=batch, micro=micro)
        clean = _noisy_update(seed=7, sigma=0.0, clip=clip, batch=batch, micro=micro)
        deviation = (noisy - clean).flatten()
        n = deviation.numel()
        expected = sigma * clip / batch
        # sample std of n Gaussians: relative standard error 1/sqrt(2n); allow 5 of them
        assert abs(float(deviation.std()) / expected - 1) < 5 / math.sqrt(2 * n)
        assert abs(float(deviation.mean())) < 5 * expected / math.sqrt(n)


def test_same_seed_bit_identical_different_seed_differs():
    a, b, c = _noisy_update(seed=3), _noisy_update(seed=3), _noisy_update(seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_noise_independent_across_consecutive_steps():
    from fastdp.kernels.noise import NoiseKey, philox_normal

    first = philox_normal((20000,), NoiseKey(1, 0, 1.0), 0)
    second = philox_normal((20000,), NoiseKey(1, 1, 1.0), 0)
    corr = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(20000)


# ---- NaN / Inf -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["flat", "per_layer", "automatic", "none"])
@pytest.mark.parametrize("warn", [False, True])
def test_non_finite_sample_is_dropped(mode, warn):
    """DP modes drop the two non-finite samples; Noisy-SGD, which has no per-sample
    gradients, drops the micro-batch. The count is a tensor, read on request: no warning
    (a per-step count is a release) unless the user opts in with ``warn_dropped``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(6, 6), torch.randn(6, 2)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    good = [0, 1, 3, 5] if mode != "none" else []
    expected = (
        oracle_grad_sum(model, x[good], y[good], mode, 0.5)
        if good
        else {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    )
    m, opt, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        clipping=mode,
        poisson_sampling=False,
        loss_reduction="sum",
    )
    opt.warn_dropped = warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_sample_loss(m(x), y).sum().backward()
        opt.step()  # the micro-batch's clipping finishes at step
    dropped = 2 if mode != "none" else 6
    said = [w for w in caught if "non-finite" in str(w.message)]
    assert len(said) == int(warn)
    assert not said or f"{dropped} sample(s)" in str(said[0].message)
    assert opt.dropped_samples == dropped
    got = {n: before[n] - p.detach() for n, p in m.named_parameters()}
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert_close_sums(got, expected)


def test_cross_entropy_training_reduces_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    m, opt, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        seed=0,
    )
    with torch.no_grad():
        first = float(F.cross_entropy(m(x), y))
    for _ in range(5):
        for xb, yb in loader:
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        assert float(F.cross_entropy(m(x), y)) < 0.7 * first


@pytest.mark.parametrize("mode", ["flat", "per_layer"])
def test_every_sample_is_clipped_before_summing(mode):
    # 8 identical samples with huge gradients: clipping each sample gives a sum of norm
    # exactly 8 * C (per_layer: each layer to C_l, total sqrt(sum C_l^2) = C); clipping only
    # the sum would give C, no clipping ~1e6
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))  # no saturation: both layers big
    x, y = (1000 * torch.randn(1, 6)).repeat(8, 1), (1000 * torch.randn(1, 2)).repeat(8, 1)
    before = [p.detach().clone() for p in model.parameters()]
    m, opt, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
        noise_multiplier=0.0,
        max_grad_norm=0.25,
        clipping=mode,
        poisson_sampling=False,
        loss_reduction="sum",
    )
    per_sample_loss(m(x), y).sum().backward()
    opt.step()
    after = [p.detach() for p in m.parameters()]
    total = math.sqrt(sum(float((b - a).square().sum()) for b, a in zip(before, after)))
    assert total == pytest.approx(8 * 0.25, rel=1e-4)


def test_two_forwards_one_backward_is_refused_and_recoverable():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model, clipping="per_layer")
    loss = per_sample_loss(m(x[:4]), y[:4]).mean() + per_sample_loss(m(x[4:8]), y[4:8]).mean()
    with pytest.raises(RuntimeError, match="second forward pass in one micro-batch"):
        loss.backward()
    with pytest.raises(RuntimeError, match="discard_logical_batch"):
        opt.step()
    opt.discard_logical_batch()
    assert all(float(buf.abs().sum()) == 0 for buf in opt.grad_sums.values())
    per_sample_loss(m(x[:4]), y[:4]).mean().backward()
    opt.step()
    assert opt.last_step_updated
