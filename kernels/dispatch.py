"""Backend selection: Triton on CUDA tensors or under TRITON_INTERPRET=1, torch otherwise.

``FASTDP_BACKEND=auto|torch|triton`` forces the choice. Asking for ``triton`` where Triton
cannot run raises; there is never a silent fallback.
"""

from __future__ import annotations

import functools
import os

import torch

_BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works in this process."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend() -> str:
    value = os.environ.get("FASTDP_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(
            f"FASTDP_BACKEND={value!r} is not a backend; use one of {', '.join(_BACKENDS)}."
        )
    return value


def use_triton(*tensors: torch.Tensor) -> bool:
    """Pick the backend for one call on ``tensors``.

    auto: Triton when every tensor is on CUDA (and Triton imports) or the interpreter is on
    with CPU tensors; torch otherwise. torch: always torch. triton: Triton or a clear error.
    """
    backend = requested_backend()
    if backend == "torch":
        return False
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    runnable = triton_available() and (on_cuda or interpreter_enabled())
    if backend == "triton":
        if not runnable:
            why = (
                "Triton is not installed"
                if not triton_available()
                else "the tensors are not on CUDA and TRITON_INTERPRET=1 is not set"
            )
            raise RuntimeError(
                f"FASTDP_BACKEND=triton was requested but {why}. Unset FASTDP_BACKEND (or set "
                "it to 'torch') to use the torch reference, or move the model to a GPU / set "
                "TRITON_INTERPRET=1."
            )
        return True
    # auto: the kernels take fp16/bf16/fp32; anything else (float64) stays on torch
    return runnable and all(t.dtype in _KERNEL_DTYPES for t in tensors if t.is_floating_point())
