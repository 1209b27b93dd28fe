"""Backend selection (kernels/dispatch.py): per call, forced by FASTDP_BACKEND, never silent."""

from __future__ import annotations

import pytest
import torch

from fastdp.kernels import dispatch
from fastdp.kernels.clipped_grad import clipped_linear_grad
from fastdp.kernels.noisy_update import noisy_adamw_update, noisy_sgd_update
from fastdp.kernels.per_sample_norm import per_sample_norm_sq


@pytest.fixture
def cpu_no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTDP_BACKEND", raising=False)


def test_auto_uses_torch_on_plain_cpu(cpu_no_interpreter):
    assert dispatch.use_triton(torch.zeros(2)) is False


def test_auto_uses_triton_under_interpreter(cpu_no_interpreter, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(torch.zeros(2)) is dispatch.triton_available()


def test_forced_torch_wins_over_interpreter(cpu_no_interpreter, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTDP_BACKEND", "torch")
    assert dispatch.use_triton(torch.zeros(2)) is False


def test_unknown_backend_is_an_error(cpu_no_interpreter, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "cuda")
    with pytest.raises(ValueError, match="not a backend"):
        dispatch.use_triton(torch.zeros(2))


def _calls():
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    p, s = [torch.zeros(3)], [torch.ones(3)]
    return {
        "per_sample_norm": lambda: per_sample_norm_sq(a, g, "ghost"),
        "clipped_grad": lambda: clipped_linear_grad(a, g, None, torch.zeros(5, 4)),
        "noisy_sgd": lambda: noisy_sgd_update(p, s, [None], lr=0.1),
        "noisy_adamw": lambda: noisy_adamw_update(
            p, s, [torch.zeros(3)], [torch.zeros(3)], step_count=1, lr=0.1
        ),
    }


@pytest.mark.parametrize("op", sorted(_calls()))
def test_forced_triton_on_plain_cpu_raises_clearly(cpu_no_interpreter, monkeypatch, op):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FASTDP_BACKEND=triton was requested"):
        _calls()[op]()


def test_forced_triton_without_triton_names_the_cause(cpu_no_interpreter, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        dispatch.use_triton(torch.zeros(2))


def test_triton_rejects_unsupported_dtype_clearly(monkeypatch):
    from kernel_testing import enable_interpreter

    enable_interpreter(monkeypatch)
    a = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="FASTDP_BACKEND=torch"):
        per_sample_norm_sq(a, a, "direct")
