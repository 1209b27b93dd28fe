"""Clipped weight gradient of a linear map: sum_i c_i G_i^T A_i.

One GEMM over all B*T rows with the per-sample scale c folded into G's rows, accumulated
into a caller-owned float64 buffer (the logical-batch accumulator; float32 is accepted).
The bias gradient is sum_i c_i sum_t g_it. Noise is added once per logical batch by the
optimizer's update (noisy_update.py), not here. This module holds the torch reference; the
Triton kernel is in clipped_grad_triton.py.
"""

from __future__ import annotations

import torch

from fastdp.kernels.dispatch import use_triton
from fastdp.kernels.rounding import samples_per_call


def _check(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    scale: torch.Tensor | None,
    out: torch.Tensor,
    bias_out: torch.Tensor | None,
) -> None:
    if activations.dim() != 3 or grad_outputs.dim() != 3:
        raise ValueError(
            "clipped_linear_grad needs A (B, T, d) and G (B, T, p); got "
            f"{tuple(activations.shape)} and {tuple(grad_outputs.shape)}"
        )
    batch, n_tokens, d_in = activations.shape
    d_out = grad_outputs.shape[2]
    if grad_outputs.shape[:2] != (batch, n_tokens):
        raise ValueError("A and G disagree on (B, T)")
    if scale is not None and scale.shape != (batch,):
        raise ValueError(f"scale must have shape ({batch},), got {tuple(scale.shape)}")
    wide = (torch.float32, torch.float64)
    if out.shape != (d_out, d_in) or out.dtype not in wide:
        raise ValueError(f"out must be float32 or float64 of shape ({d_out}, {d_in})")
    if bias_out is not None and (bias_out.shape != (d_out,) or bias_out.dtype not in wide):
        raise ValueError(f"bias_out must be float32 or float64 of shape ({d_out},)")


def clipped_linear_grad_torch(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    scale: torch.Tensor | None,
    out: torch.Tensor,
    bias_out: torch.Tensor | None = None,
) -> None:
    """Torch reference; see ``clipped_linear_grad``."""
    d_in = activations.shape[2]
    d_out = grad_outputs.shape[2]
    # float64 inputs are reduced in float64; float32 inputs in float32, added to a float64
    # buffer once per call
    work = torch.float64 if activations.dtype == torch.float64 else torch.float32
    g = grad_outputs.to(work)
    if scale is not None:
        g = g * scale.to(work)[:, None, None]
    a = activations.to(work)
    rows_g, rows_a = g.reshape(-1, d_out), a.reshape(-1, d_in)
    if work == out.dtype:
        out.addmm_(rows_g.t(), rows_a)
    else:  # one call's product in its working precision, added into the wider buffer
        out.add_(rows_g.t() @ rows_a)
    if bias_out is not None:
        bias_out.add_(g.sum((0, 1)))


def clipped_linear_grad(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    scale: torch.Tensor | None,
    out: torch.Tensor,
    bias_out: torch.Tensor | None = None,
) -> None:
    """out += sum_i scale_i G_i^T A_i; bias_out += sum_i scale_i sum_t G_it.

    A: (B, T, d), G: (B, T, p) in any float dtype; scale: (B,) or None (all ones);
    out: (p, d) float64 (the logical-batch accumulator) or float32, bias_out: (p,) of the
    same dtypes or None, both updated in place.
    """
    _check(activations, grad_outputs, scale, out, bias_out)
    impl = clipped_linear_grad_torch
    if use_triton(activations, grad_outputs, out):
        from fastdp.kernels import clipped_grad_triton

        impl = _into_float32(clipped_grad_triton.clipped_linear_grad)
    # whole samples per call, about GEMM_ROW_CHUNK rows: the depth of the float32 reduction a
    # sample's terms pass through is then fixed by its own T, whatever B is
    # (kernels/rounding.py: accumulation_depth; the certified norms include it)
    step = samples_per_call(activations.shape[1])
    for start in range(0, activations.shape[0], step):
        end = start + step
        part = None if scale is None else scale[start:end]
        impl(activations[start:end], grad_outputs[start:end], part, out, bias_out)


def _into_float32(kernel):
    """The Triton kernel writes float32: give it float32 scratch and add that into a float64
    accumulator (one call's result, one rounding)."""

    def call(activations, grad_outputs, scale, out, bias_out):
        if out.dtype == torch.float32 and (bias_out is None or bias_out.dtype == torch.float32):
            return kernel(activations, grad_outputs, scale, out, bias_out)
        out32 = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        bias32 = None if bias_out is None else torch.zeros_like(bias_out, dtype=torch.float32)
        kernel(activations, grad_outputs, scale, out32, bias32)
        out.add_(out32)
        if bias_out is not None:
            bias_out.add_(bias32)

    return call
