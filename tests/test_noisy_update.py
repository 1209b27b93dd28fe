"""Noisy multi-tensor SGD / AdamW update: torch.optim -> reference -> Triton kernel."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_low_precision_rule, enable_gpu, enable_interpreter

from fastdp.kernels import config
from fastdp.kernels import noisy_update as nu
from fastdp.kernels.noise import NoiseKey, derive_secret

SHAPES = [(5, 3), (17,), (2, 3, 4), (1,), (67,)]  # odd sizes, several chunks, one < 4
SGD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
    dict(lr=0.1, momentum=0.9, maximize=True),
]
ADAMW_OPTIONS = [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, maximize=True)]


def _tensors(dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    return params, grads


SECRET = derive_secret(5)


def _sgd(fn, params, grads, options, std=0.0):
    buffers = [None] * len(params)
    for step, grad_sums in enumerate(grads):
        noise = NoiseKey(SECRET, step, std)
        buffers = fn(params, grad_sums, buffers, scale=0.5, noise=noise, **options)
    return params, buffers


def _adamw(fn, params, grads, options, std=0.0):
    options = dict(options)
    beta1, beta2 = options.pop("betas", (0.9, 0.999))
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, grad_sums in enumerate(grads):
        fn(params, grad_sums, m, v, step_count=step + 1, beta1=beta1, beta2=beta2, scale=0.5,
           noise=NoiseKey(SECRET, step, std), **options)  # fmt: skip
    return params, m, v


@pytest.mark.parametrize("options", SGD_OPTIONS)
def test_sgd_reference_equals_torch_sgd(options):
    params, grads = _tensors()
    mine = _sgd(nu.noisy_sgd_update_torch, [p.clone() for p in params], grads, options)[0]
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(leaves, **options)
    for grad_sums in grads:
        for p, g in zip(leaves, grad_sums):
            p.grad = g * 0.5
        opt.step()
    for a, b in zip(mine, leaves):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("options", ADAMW_OPTIONS)
def test_adamw_reference_equals_torch_adamw(options):
    params, grads = _tensors()
    mine = _adamw(nu.noisy_adamw_update_torch, [p.clone() for p in params], grads, options)[0]
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(leaves, **options)
    for grad_sums in grads:
        for p, g in zip(leaves, grad_sums):
            p.grad = g * 0.5
        opt.step()
    for a, b in zip(mine, leaves):
        assert torch.equal(a, b.detach())


@pytest.fixture
def interpreter(monkeypatch):
    enable_interpreter(monkeypatch)


def _assert_lists_close(xs, ys):
    for x, y in zip(xs, ys):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", SGD_OPTIONS)
def test_triton_sgd_matches_reference(interpreter, options):
    params, grads = _tensors()
    got = _sgd(nu.noisy_sgd_update, [p.clone() for p in params], grads, options)
    want = _sgd(nu.noisy_sgd_update_torch, [p.clone() for p in params], grads, options)
    _assert_lists_close(got[0], want[0])
    _assert_lists_close(got[1], want[1])


@pytest.mark.parametrize("options", ADAMW_OPTIONS)
def test_triton_adamw_matches_reference(interpreter, options):
    params, grads = _tensors()
    got = _adamw(nu.noisy_adamw_update, [p.clone() for p in params], grads, options)
    want = _adamw(nu.noisy_adamw_update_torch, [p.clone() for p in params], grads, options)
    for xs, ys in zip(got, want):
        _assert_lists_close(xs, ys)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_triton_noise_equals_reference_noise(interpreter, kind):
    """One generator for both backends: the kernel's Philox noise is the CPU reference's, up
    to float32 rounding of log/sin/cos."""
    params, grads = _tensors()
    if kind == "sgd":
        got = _sgd(nu.noisy_sgd_update, [p.clone() for p in params], grads, SGD_OPTIONS[1], 2.0)
        want = _sgd(nu.noisy_sgd_update_torch, [p.clone() for p in params], grads,
                    SGD_OPTIONS[1], 2.0)  # fmt: skip
    else:
        got = _adamw(nu.noisy_adamw_update, [p.clone() for p in params], grads,
                     ADAMW_OPTIONS[0], 2.0)  # fmt: skip
        want = _adamw(nu.noisy_adamw_update_torch, [p.clone() for p in params], grads,
                      ADAMW_OPTIONS[0], 2.0)  # fmt: skip
    for xs, ys in zip(got, want):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_triton_empty_and_zero_size(interpreter):
    assert nu.noisy_sgd_update([], [], [], lr=0.1) == []
    p, g = [torch.zeros(0)], [torch.zeros(0)]
    nu.noisy_adamw_update(p, g, [torch.zeros(0)], [torch.zeros(0)], step_count=1, lr=0.1)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_triton_bf16_params_within_flash_attention_rule(interpreter, kind):
    """bf16 params (float32 grad sums) next to float32 ones: two dtype groups, one call each."""
    params32, grads = _tensors()
    run = (
        (lambda fn, ps: _sgd(fn, ps, grads, SGD_OPTIONS[2])[0])
        if kind == "sgd"
        else (lambda fn, ps: _adamw(fn, ps, grads, ADAMW_OPTIONS[0])[0])
    )
    ref_fn = nu.noisy_sgd_update_torch if kind == "sgd" else nu.noisy_adamw_update_torch
    fn = nu.noisy_sgd_update if kind == "sgd" else nu.noisy_adamw_update
    mixed = [p.bfloat16() if k % 2 == 0 else p.clone() for k, p in enumerate(params32)]
    reference = run(ref_fn, [p.clone() for p in params32])
    torch_same = run(ref_fn, [p.clone() for p in mixed])
    got = run(fn, [p.clone() for p in mixed])
    for k, (x, y, r) in enumerate(zip(got, torch_same, reference)):
        assert x.dtype == mixed[k].dtype
        if x.dtype == torch.float32:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        else:
            assert_low_precision_rule(x, y, r, atol=1e-6)


def _noise_draw(fn_name="noisy_sgd_update", n=4096, seed=3, step=0, streams=None):
    """Two tensors of n elements that end up equal to their noise (std 2, scale 1)."""
    params = [torch.zeros(n), torch.zeros(n)]
    zeros = [torch.zeros(n), torch.zeros(n)]
    noise = NoiseKey(derive_secret(seed), step, 2.0)
    getattr(nu, fn_name)(params, zeros, [None, None], lr=-1.0, noise=noise, streams=streams)
    return params


@pytest.mark.parametrize("fn_name", ["noisy_sgd_update", "noisy_sgd_update_torch"])
def test_noise_same_key_same_values(interpreter, fn_name):
    first = _noise_draw(fn_name, n=100)
    assert all(torch.equal(a, b) for a, b in zip(first, _noise_draw(fn_name, n=100)))
    assert not torch.equal(first[0], _noise_draw(fn_name, n=100, step=1)[0])
    assert not torch.equal(first[0], _noise_draw(fn_name, n=100, seed=4)[0])
    assert torch.equal(first[0], _noise_draw(fn_name, n=100, streams=[1, 0])[1])


def test_noise_does_not_depend_on_block(interpreter, monkeypatch):
    small = _noise_draw(n=300)
    monkeypatch.setattr(config, "update_config", lambda device: config.ElementwiseConfig(1024))
    assert all(torch.equal(a, b) for a, b in zip(small, _noise_draw(n=300)))


@pytest.mark.parametrize("fn_name", ["noisy_sgd_update", "noisy_sgd_update_torch"])
def test_noise_statistics(interpreter, monkeypatch, fn_name):
    """N = 4096 draws of std 2; each bound is 5 standard errors: mean 5 * 2 / sqrt(N), std
    5 * 2 / sqrt(2N), correlations 5 / sqrt(N) (neighbours at lag 1 and 4, which share or
    straddle a Philox call, consecutive steps, two streams in one call)."""
    monkeypatch.setattr(config, "update_config", lambda device: config.ElementwiseConfig(1024))
    x, other_stream = _noise_draw(fn_name)
    x_next = _noise_draw(fn_name, step=1)[0]
    n = x.numel()
    assert abs(x.mean().item()) < 5 * 2 / n**0.5
    assert abs(x.std().item() - 2) < 5 * 2 / (2 * n) ** 0.5
    for u, v in [(x[:-1], x[1:]), (x[:-4], x[4:]), (x, x_next), (x, other_stream)]:
        corr = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
        assert abs(corr) < 5 / u.numel() ** 0.5, corr


@pytest.mark.gpu
def test_gpu_large_update_matches_reference(monkeypatch):
    enable_gpu(monkeypatch)
    shapes = [(1024, 1024)] * 8 + [(1024,)] * 8 + [(50257, 768)]
    params, grads = _tensors(shapes=shapes)
    params = [p.cuda() for p in params]
    grads = [[g.cuda() for g in gs] for gs in grads]
    got = _sgd(nu.noisy_sgd_update, [p.clone() for p in params], grads, SGD_OPTIONS[2])
    want = _sgd(nu.noisy_sgd_update_torch, [p.clone() for p in params], grads, SGD_OPTIONS[2])
    _assert_lists_close(got[0], want[0])
    got = _adamw(nu.noisy_adamw_update, [p.clone() for p in params], grads, ADAMW_OPTIONS[0])
    want = _adamw(nu.noisy_adamw_update_torch, [p.clone() for p in params], grads,
                  ADAMW_OPTIONS[0])  # fmt: skip
    for xs, ys in zip(got, want):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
