"""Per-sample squared norms: oracle -> torch reference -> Triton kernels (interpreter, GPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_low_precision_rule, enable_gpu, enable_interpreter

from fastdp.kernels.per_sample_norm import (
    choose_method,
    direct_flops,
    ghost_flops,
    per_sample_norm_sq,
    per_sample_norm_sq_torch,
)

D_IN, D_OUT = 19, 23  # not multiples of any block


def oracle_norm_sq(activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """||dL_i/dW||^2 from autograd, one sample at a time, for L_i = <G_i, A_i W^T>."""
    d_in, d_out = activations.shape[2], grad_outputs.shape[2]
    norms = []
    for a, g in zip(activations.double(), grad_outputs.double()):
        weight = torch.zeros(d_out, d_in, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad((g * (a @ weight.t())).sum(), weight)
        norms.append(grad.square().sum())
    return torch.stack(norms).float() if norms else torch.zeros(0)


def _inputs(batch: int, n_tokens: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n_tokens, D_IN, generator=gen).to(dtype)
    g = torch.randn(batch, n_tokens, D_OUT, generator=gen).to(dtype)
    return a, g


@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("n_tokens", [1, 5, 17])
def test_reference_matches_per_sample_oracle(method, n_tokens):
    a, g = _inputs(3, n_tokens)
    torch.testing.assert_close(
        per_sample_norm_sq_torch(a, g, method), oracle_norm_sq(a, g), rtol=1e-5, atol=1e-5
    )


def test_choice_is_the_cheaper_by_flops():
    assert choose_method(8, 512, 1024, 1024) == "ghost"  # T = d p / (d + p): a tie
    assert choose_method(8, 513, 1024, 1024) == "direct"
    assert choose_method(8, 64, 1024, 1024) == "ghost"
    for shape in [(8, 512, 1024, 1024), (8, 1, 3, 4), (2, 300, 64, 64)]:
        cheaper = min(("ghost", ghost_flops(*shape)), ("direct", direct_flops(*shape)),
                      key=lambda kv: kv[1])[0]  # fmt: skip
        tie = ghost_flops(*shape) == direct_flops(*shape)
        assert choose_method(*shape) == ("ghost" if tie else cheaper)


@pytest.fixture
def interpreter(monkeypatch):
    enable_interpreter(monkeypatch)


@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("n_tokens", [1, 5, 17])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_triton_matches_reference(interpreter, batch, n_tokens, method):
    a, g = _inputs(batch, n_tokens)
    out = per_sample_norm_sq(a, g, method)
    assert out.shape == (batch,) and out.dtype == torch.float32
    torch.testing.assert_close(out, per_sample_norm_sq_torch(a, g, method), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_triton_long_tokens_and_strided_inputs(interpreter, method):
    """T = 40 spans three token blocks (ghost: six block pairs); inputs are transposed views."""
    a_t = torch.randn(2, D_IN, 40)
    g_t = torch.randn(2, D_OUT, 40)
    a, g = a_t.transpose(1, 2), g_t.transpose(1, 2)
    torch.testing.assert_close(
        per_sample_norm_sq(a, g, method), per_sample_norm_sq_torch(a, g, method), rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_triton_bf16_within_flash_attention_rule(interpreter, method):
    a32, g32 = _inputs(3, 17)
    a, g = a32.bfloat16(), g32.bfloat16()
    reference = per_sample_norm_sq_torch(a32, g32, method)
    torch_bf16 = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2), dtype=torch.bfloat16)
    out = per_sample_norm_sq(a, g, method)
    assert_low_precision_rule(out, torch_bf16, reference, atol=1e-5 * reference.abs().max())


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_triton_offsets_past_int32(interpreter, method):
    """Sample 2 starts at element 2^31 + 256: the batch offset must be computed in int64.

    The storage is 4 GiB of untouched virtual memory; only the rows of the view are written.
    """
    n_tokens = 5
    stride = (1 << 30) + 128
    storage_a = torch.empty(2 * stride + n_tokens * D_IN, dtype=torch.bfloat16)
    storage_g = torch.empty(2 * stride + n_tokens * D_OUT, dtype=torch.bfloat16)
    a = storage_a.as_strided((3, n_tokens, D_IN), (stride, D_IN, 1))
    g = storage_g.as_strided((3, n_tokens, D_OUT), (stride, D_OUT, 1))
    a.normal_()
    g.normal_()
    torch.testing.assert_close(
        per_sample_norm_sq(a, g, method), per_sample_norm_sq_torch(a, g, method), rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_gpu_full_size_bf16(monkeypatch, method):
    enable_gpu(monkeypatch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1024, 512, 1024)
    a32 = torch.randn(shape, device="cuda", generator=gen)
    g32 = torch.randn(shape, device="cuda", generator=gen)
    a, g = a32.bfloat16(), g32.bfloat16()
    reference = per_sample_norm_sq_torch(a32, g32, method)
    torch_bf16 = torch.bmm(g.transpose(1, 2), a).float().square().sum((1, 2))
    out = per_sample_norm_sq(a, g, method)
    assert_low_precision_rule(out, torch_bf16, reference, atol=1e-5 * reference.abs().max())
