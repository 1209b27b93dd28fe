"""Shared helpers for the kernel tests: backend switching and the low-precision error rule."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

TRITON_MODULES = (
    "fastdp.kernels.per_sample_norm_triton",
    "fastdp.kernels.clipped_grad_triton",
    "fastdp.kernels.noisy_update_triton",
)


def _load_kernels(interpreted: bool) -> None:
    """Import the Triton modules so their kernels match the mode.

    ``@triton.jit`` picks interpreter or compiler when the module is imported, so a module
    imported before TRITON_INTERPRET changed is reloaded.
    """
    from triton.runtime.interpreter import InterpretedFunction

    for name in TRITON_MODULES:
        module = sys.modules.get(name)
        if module is None:
            importlib.import_module(name)
            continue
        kernels = [v for k, v in vars(module).items() if k.endswith("_kernel")]
        if any(isinstance(k, InterpretedFunction) != interpreted for k in kernels):
            importlib.reload(module)


def enable_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernels on CPU through Triton's interpreter for this test."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    _load_kernels(interpreted=True)


def enable_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled Triton on CUDA; skips where there is no GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    _load_kernels(interpreted=False)


def use_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTDP_BACKEND", "torch")


def assert_low_precision_rule(
    out: torch.Tensor, out_torch_same_dtype: torch.Tensor, reference: torch.Tensor, atol: float
) -> None:
    """flash-attention's rule (style.md): max |kernel - ref| <= 2 max |torch - ref| + atol.

    ``reference`` is float32 math on the float32 inputs; ``out_torch_same_dtype`` is torch
    computing at the kernel's low-precision dtype.
    """
    error = (out.float() - reference).abs().max().item()
    torch_error = (out_torch_same_dtype.float() - reference).abs().max().item()
    assert error <= 2 * torch_error + atol, (error, torch_error, atol)
