"""Clipped weight gradient of a linear map: sum_i c_i G_i^T A_i.

One GEMM over all B*T rows with the per-sample scale c folded into G's rows, accumulated in
float32 into a caller-owned buffer (the logical-batch accumulator). The bias gradient is
sum_i c_i sum_t g_it. Noise is added once per logical batch by the optimizer's update
(noisy_update.py), not here. This module holds the torch reference; the Triton kernel is in
clipped_grad_triton.py.
"""

from __future__ import annotations

import torch

from fastdp.kernels.dispatch import use_triton


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
    if out.shape != (d_out, d_in) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 of shape ({d_out}, {d_in})")
    if bias_out is not None and (bias_out.shape != (d_out,) or bias_out.dtype != torch.float32):
        raise ValueError(f"bias_out must be float32 of shape ({d_out},)")


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
    g = grad_outputs.float()
    if scale is not None:
        g = g * scale.float()[:, None, None]
    a = activations.float()
    out.addmm_(g.reshape(-1, d_out).t(), a.reshape(-1, d_in))
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
    out: (p, d) float32, bias_out: (p,) float32 or None, both updated in place.
    """
    _check(activations, grad_outputs, scale, out, bias_out)
    impl = clipped_linear_grad_torch
    if use_triton(activations, grad_outputs, out):
        from fastdp.kernels import clipped_grad_triton

        impl = clipped_grad_triton.clipped_linear_grad
    impl(activations, grad_outputs, scale, out, bias_out)
