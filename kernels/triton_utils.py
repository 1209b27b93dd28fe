"""Host-side helpers shared by the Triton launchers (imported only where Triton runs)."""

from __future__ import annotations

import torch
import triton.language as tl

from fastdp.kernels.dispatch import interpreter_enabled

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type of a supported torch float dtype."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"the Triton kernels take float32, bfloat16 or float16 tensors, not {dtype}; "
            "set FASTDP_BACKEND=torch for other dtypes"
        ) from None


def dot_dtype(operand: torch.dtype) -> tl.dtype:
    """Triton type of the ``tl.dot`` operands (``config.operand_dtype`` of the inputs).

    Under the interpreter always float32: its ``tl.dot`` on bfloat16 operands returns garbage
    (Triton 3.9), and float32 products of bfloat16 values are exact, as on tensor cores.
    """
    return tl.float32 if interpreter_enabled() else tl_dtype(operand)


def check_same_device(*tensors: torch.Tensor) -> torch.device:
    device = tensors[0].device
    for tensor in tensors[1:]:
        if tensor.device != device:
            raise ValueError(f"tensors on different devices: {device} and {tensor.device}")
    return device
