"""Clipped weight gradient sum_i c_i G_i^T A_i: oracle -> reference -> Triton."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import assert_low_precision_rule, enable_gpu, enable_interpreter

from fastdp.kernels import config
from fastdp.kernels.clipped_grad import clipped_linear_grad, clipped_linear_grad_torch

D_IN, D_OUT = 19, 23  # not multiples of any block


def oracle(activations, grad_outputs, scale):
    """sum_i c_i dL_i/d(W, b) from autograd, one sample at a time, L_i = <G_i, A_i W^T + b>."""
    weight_sum = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    bias_sum = torch.zeros(D_OUT, dtype=torch.float64)
    for a, g, c in zip(activations.double(), grad_outputs.double(), scale.double()):
        weight = torch.zeros(D_OUT, D_IN, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(D_OUT, dtype=torch.float64, requires_grad=True)
        grad_w, grad_b = torch.autograd.grad((g * (a @ weight.t() + bias)).sum(), (weight, bias))
        weight_sum += c * grad_w
        bias_sum += c * grad_b
    return weight_sum.float(), bias_sum.float()


def _inputs(batch, n_tokens, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n_tokens, D_IN, generator=gen)
    g = torch.randn(batch, n_tokens, D_OUT, generator=gen)
    return a.to(dtype), g.to(dtype), torch.rand(batch, generator=gen)


def _run(fn, a, g, scale, *, start=None, bias=True, **kwargs):
    out = torch.zeros(D_OUT, D_IN) if start is None else start[0].clone()
    bias_out = None
    if bias:
        bias_out = torch.zeros(D_OUT) if start is None else start[1].clone()
    fn(a, g, scale, out, bias_out, **kwargs)
    return out, bias_out


@pytest.mark.parametrize("n_tokens", [1, 5, 17])
def test_reference_matches_per_sample_oracle(n_tokens):
    a, g, scale = _inputs(3, n_tokens)
    out, bias = _run(clipped_linear_grad_torch, a, g, scale)
    want_w, want_b = oracle(a, g, scale)
    torch.testing.assert_close(out, want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias, want_b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def interpreter(monkeypatch):
    enable_interpreter(monkeypatch)


@pytest.mark.parametrize("n_tokens", [1, 5, 17])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_triton_matches_reference(interpreter, batch, n_tokens):
    a, g, scale = _inputs(batch, n_tokens)
    start = (torch.randn(D_OUT, D_IN), torch.randn(D_OUT))  # accumulates into what is there
    got = _run(clipped_linear_grad, a, g, scale, start=start)
    want = _run(clipped_linear_grad_torch, a, g, scale, start=start)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _force_split(monkeypatch, n_split: int) -> None:
    """config.clipped_grad_plan with ``n_split`` K splits (rows rounded to the K block)."""
    real = config.clipped_grad_plan

    def plan(d_out, d_in, n_rows, dtype, spec):
        chosen = real(d_out, d_in, n_rows, dtype, spec)
        block_k = chosen.tile.block_k
        rows = math.ceil(math.ceil(n_rows / n_split) / block_k) * block_k
        return config.ClippedGradPlan(chosen.tile, chosen.n_tiles, math.ceil(n_rows / rows), rows)

    monkeypatch.setattr(config, "clipped_grad_plan", plan)


@pytest.mark.parametrize("n_split", [1, 3])
def test_triton_split_k_no_scale_no_bias_strided(interpreter, monkeypatch, n_split):
    _force_split(monkeypatch, n_split)
    a = torch.randn(5, D_IN, 17).transpose(1, 2)  # 85 rows, strided
    g = torch.randn(5, 17, D_OUT)
    got = _run(clipped_linear_grad, a, g, None, bias=False)
    want = _run(clipped_linear_grad_torch, a, g, None, bias=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1] is None


def test_triton_bf16_within_flash_attention_rule(interpreter):
    a32, g32, scale = _inputs(3, 17)
    a, g = a32.bfloat16(), g32.bfloat16()
    want_w, want_b = _run(clipped_linear_grad_torch, a32, g32, scale)
    g_scaled = (g * scale.bfloat16()[:, None, None]).reshape(-1, D_OUT)
    torch_w = g_scaled.t() @ a.reshape(-1, D_IN)  # torch at bf16
    torch_b = g_scaled.sum(0)
    got_w, got_b = _run(clipped_linear_grad, a, g, scale)
    assert_low_precision_rule(got_w, torch_w, want_w, atol=1e-5 * want_w.abs().max())
    assert_low_precision_rule(got_b, torch_b, want_b, atol=1e-5 * want_b.abs().max())


def test_triton_offsets_past_int32(interpreter):
    """Sample 2 starts at element 2^31 + 256 of a 4 GiB (untouched, virtual) storage."""
    n_tokens, stride = 5, (1 << 30) + 128
    a = torch.empty(2 * stride + n_tokens * D_IN, dtype=torch.bfloat16)
    a = a.as_strided((3, n_tokens, D_IN), (stride, D_IN, 1)).normal_()
    g = torch.randn(3, n_tokens, D_OUT, dtype=torch.bfloat16)
    scale = torch.rand(3)
    got = _run(clipped_linear_grad, a, g, scale)
    want = _run(clipped_linear_grad_torch, a, g, scale)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_split", [1, 3])
def test_triton_split_k_bias_of_one_output(interpreter, monkeypatch, n_split):
    """p = 1 (a bias of one element: Triton specialises n_rows = 1 of the bias reduction)."""
    _force_split(monkeypatch, n_split)
    a, g, scale = torch.randn(5, 17, D_IN), torch.randn(5, 17, 1), torch.rand(5)
    got = torch.zeros(1, D_IN), torch.zeros(1)
    want = torch.zeros(1, D_IN), torch.zeros(1)
    clipped_linear_grad(a, g, scale, *got)
    clipped_linear_grad_torch(a, g, scale, *want)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_full_size_bf16(monkeypatch):
    enable_gpu(monkeypatch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a32 = torch.randn(1024, 512, 1024, device="cuda", generator=gen)
    g32 = torch.randn(1024, 512, 1024, device="cuda", generator=gen)
    scale = torch.rand(1024, device="cuda", generator=gen)
    a, g = a32.bfloat16(), g32.bfloat16()
    want = torch.zeros(1024, 1024, device="cuda")
    clipped_linear_grad_torch(a32, g32, scale, want)
    g_scaled = (g * scale.bfloat16()[:, None, None]).reshape(-1, 1024)
    torch_bf16 = g_scaled.t() @ a.reshape(-1, 1024)
    got = torch.zeros(1024, 1024, device="cuda")
    clipped_linear_grad(a, g, scale, got)
    assert_low_precision_rule(got, torch_bf16, want, atol=1e-5 * want.abs().max())
