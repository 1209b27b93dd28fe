"""fused_noisy_step, DPSGD and DPAdamW against torch.optim.SGD / AdamW."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import enable_interpreter, use_torch

import fastdp
from fastdp.kernels.noise import NoiseKey, derive_secret
from fastdp.kernels.noisy_update import noisy_gradient_torch
from fastdp.optimizers import DPSGD, DPAdamW, fused_noisy_step

MAKERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01
    ),
    "sgd_nesterov_max": lambda ps: DPSGD(ps, lr=0.05, momentum=0.9, nesterov=True, maximize=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "dpadamw_groups": lambda ps: DPAdamW(
        [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03, "betas": (0.8, 0.9)}], lr=0.01
    ),
}
SHAPES = [(5, 3), (7,), (2, 2, 3)]


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _sums(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return {p: torch.randn(p.shape, generator=gen) for p in params}


def _train(maker, fused: bool, steps=3, noise_std=0.0, start=0, params=None, opt=None):
    """steps of fused_noisy_step, or of the engine's fallback (p.grad = noisy g; step())."""
    params = params if params is not None else _params()
    opt = opt if opt is not None else maker(params)
    streams = {p: k for k, p in enumerate(params)}
    for step in range(start, start + steps):
        sums = _sums(params, step)
        key = dict(noise=NoiseKey(derive_secret(7), step, noise_std), scale=0.25)
        if fused:
            assert fused_noisy_step(opt, sums, streams=streams, **key)
        else:
            for p in params:
                p.grad = noisy_gradient_torch(sums[p], stream=streams[p], **key).to(p.dtype)
            opt.step()
    return params, opt


def _assert_state_equal(a: dict, b: dict, exact: bool):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for name, x in a["state"][k].items():
            y = b["state"][k][name]
            if exact:
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("noise_std", [0.0, 0.5])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_torch_backend_bit_identical_to_fallback(monkeypatch, name, noise_std):
    """The fused torch path and p.grad + optimizer.step() give the same bits, noise or not."""
    use_torch(monkeypatch)
    fused, opt_f = _train(MAKERS[name], True, noise_std=noise_std)
    plain, opt_p = _train(MAKERS[name], False, noise_std=noise_std)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    _assert_state_equal(opt_f.state_dict(), opt_p.state_dict(), exact=True)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_triton_matches_torch_optimizer(monkeypatch, name):
    enable_interpreter(monkeypatch)
    fused, opt_f = _train(MAKERS[name], True)
    use_torch(monkeypatch)
    plain, opt_p = _train(MAKERS[name], False)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    _assert_state_equal(opt_f.state_dict(), opt_p.state_dict(), exact=False)


@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adamw"])
def test_state_dict_round_trips_with_plain_optimizer(monkeypatch, name):
    """fused for 2 steps -> plain optimizer for 2 -> fused for 2, equals plain for all 6."""
    use_torch(monkeypatch)
    want, _ = _train(MAKERS[name], False, steps=6)
    params, opt = _train(MAKERS[name], True, steps=2)
    plain = MAKERS[name](params)
    plain.load_state_dict(opt.state_dict())
    _train(MAKERS[name], False, steps=2, start=2, params=params, opt=plain)
    fused = MAKERS[name](params)
    fused.load_state_dict(plain.state_dict())
    _train(MAKERS[name], True, steps=2, start=4, params=params, opt=fused)
    for a, b in zip(params, want):
        assert torch.equal(a, b)


def test_frozen_params_are_skipped(monkeypatch):
    use_torch(monkeypatch)
    params = _params()
    before = params[1].detach().clone()
    opt = torch.optim.AdamW(params, lr=0.1)
    sums = _sums(params, 0)
    del sums[params[1]]
    streams = {p: k for k, p in enumerate(params)}
    assert fused_noisy_step(opt, sums, noise=NoiseKey(0, 0, 1.0), scale=1.0, streams=streams)
    assert torch.equal(params[1], before)
    assert params[1] not in opt.state and params[0] in opt.state


class _MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    "maker",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.1),
        lambda ps: _MySGD(ps, lr=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, amsgrad=True),
        lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(0.1)),
        lambda ps: torch.optim.SGD(ps, lr=0.1, differentiable=True),
        lambda ps: torch.optim.RMSprop(ps, lr=0.1),
    ],
)
def test_unsupported_optimizers_are_left_alone(monkeypatch, maker):
    use_torch(monkeypatch)
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = maker(params)
    sums = _sums(params, 0)
    streams = {p: k for k, p in enumerate(params)}
    assert not fused_noisy_step(opt, sums, noise=NoiseKey(0, 0, 1.0), scale=1.0, streams=streams)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert len(opt.state) == 0


@pytest.mark.parametrize("pair", [(DPSGD, torch.optim.SGD), (DPAdamW, torch.optim.AdamW)])
def test_dp_optimizers_step_like_torch(pair):
    mine, theirs = pair
    kwargs = dict(lr=0.1, weight_decay=0.01)
    a, b = _params(), _params()
    opt_a, opt_b = mine(a, **kwargs), theirs(b, **kwargs)
    for step in range(3):
        for pa, pb, g in zip(a, b, _sums(a, step).values()):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert fastdp.DPSGD is DPSGD and fastdp.DPAdamW is DPAdamW


def test_noisy_step_method(monkeypatch):
    """Noisy-SGD (no clipping) straight from gradient sums; streams default to positions."""
    use_torch(monkeypatch)
    a, b = _params(), _params()
    opt = DPSGD(a, lr=0.1, momentum=0.9)
    key = NoiseKey(derive_secret(1), 0, 1.0)
    opt.noisy_step(_sums(a, 0), noise=key, scale=0.5)
    ref = torch.optim.SGD(b, lr=0.1, momentum=0.9)
    for k, (p, g) in enumerate(zip(b, _sums(b, 0).values())):
        p.grad = noisy_gradient_torch(g, noise=key, scale=0.5, stream=k)
    ref.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    bad = DPAdamW(_params(), lr=0.1, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        bad.noisy_step({}, noise=None, scale=1.0)


def _engine_run(seed: int = 0) -> list[torch.Tensor]:
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 19), torch.nn.Tanh(), torch.nn.Linear(19, 3))
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(6, 7, generator=gen), torch.randint(0, 3, (6,), generator=gen))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine = fastdp.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=3),
        noise_multiplier=0.0, max_grad_norm=0.1, poisson_sampling=False, seed=0,
    )  # fmt: skip
    for x, y in loader:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_end_to_end_triton_equals_torch(monkeypatch):
    """make_private + 2 logical steps, noise off: Triton (interpreter) vs torch within 1e-5."""
    use_torch(monkeypatch)
    want = _engine_run()
    enable_interpreter(monkeypatch)
    got = _engine_run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
