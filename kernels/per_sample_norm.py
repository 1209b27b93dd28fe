"""Per-sample squared Frobenius norms of linear-map gradients, ||G_i^T A_i||_F^2.

A linear map y_t = W a_t applied to T positions of sample i has the per-sample weight gradient
G_i^T A_i (p x d). Two ways to get its squared norm without keeping it:

- direct: form G_i^T A_i tile by tile and square it, 2*B*T*d*p FLOPs;
- ghost:  sum_{t,s} (a_t . a_s)(g_t . g_s), 2*B*T^2*(d+p) FLOPs, never forms a d x p matrix.

``per_sample_norm_sq`` picks the cheaper per call (T changes between calls, so nothing is
cached). This module holds the torch reference; the kernels are in per_sample_norm_triton.py.
Both are estimates: clipping uses the certified upper bounds of certified_norm.py.
"""

from __future__ import annotations

import torch

from fastdp.kernels.dispatch import use_triton

METHODS = ("ghost", "direct")
_CHUNK_ELEMENTS = 1 << 24  # bound on the torch reference's per-chunk intermediate (64 MiB fp32)


def direct_flops(batch: int, n_tokens: int, d_in: int, d_out: int) -> int:
    return 2 * batch * n_tokens * d_in * d_out


def ghost_flops(batch: int, n_tokens: int, d_in: int, d_out: int) -> int:
    return 2 * batch * n_tokens * n_tokens * (d_in + d_out)


def choose_method(batch: int, n_tokens: int, d_in: int, d_out: int) -> str:
    """The cheaper of ghost and direct by FLOPs (ties go to ghost: it needs no d x p tile)."""
    if ghost_flops(batch, n_tokens, d_in, d_out) <= direct_flops(batch, n_tokens, d_in, d_out):
        return "ghost"
    return "direct"


def _check(activations: torch.Tensor, grad_outputs: torch.Tensor) -> None:
    if activations.dim() != 3 or grad_outputs.dim() != 3:
        raise ValueError(
            "per-sample norms need A of shape (B, T, d) and G of shape (B, T, p); got "
            f"{tuple(activations.shape)} and {tuple(grad_outputs.shape)}"
        )
    if activations.shape[:2] != grad_outputs.shape[:2]:
        raise ValueError(
            f"A {tuple(activations.shape)} and G {tuple(grad_outputs.shape)} disagree on (B, T)"
        )


def per_sample_norm_sq_torch(
    activations: torch.Tensor, grad_outputs: torch.Tensor, method: str
) -> torch.Tensor:
    """Torch reference. A: (B, T, d), G: (B, T, p), any float dtype. Returns (B,) float32."""
    if method not in METHODS:
        raise ValueError(f"unknown per-sample norm method {method!r}; use one of {METHODS}")
    a = activations.float()
    g = grad_outputs.float()
    batch, n_tokens, d_in = a.shape
    if n_tokens == 1:  # T = 1: ||a||^2 ||g||^2, both methods agree
        a_sq = torch.linalg.vector_norm(a.flatten(1), dim=1).square()
        return a_sq * torch.linalg.vector_norm(g.flatten(1), dim=1).square()
    # chunk the batch so the per-chunk intermediate (T x T Grams or p x d gradients) stays
    # under _CHUNK_ELEMENTS: memory is bounded whatever B is
    per_sample = n_tokens * n_tokens if method == "ghost" else d_in * g.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // per_sample)
    norms = []
    for a_c, g_c in zip(a.split(chunk), g.split(chunk)):
        if method == "ghost":
            gram_a = torch.bmm(a_c, a_c.transpose(1, 2))
            gram_g = torch.bmm(g_c, g_c.transpose(1, 2))
            norms.append((gram_a * gram_g).sum((1, 2)))
        else:
            norms.append(torch.bmm(g_c.transpose(1, 2), a_c).square().sum((1, 2)))
    return torch.cat(norms) if norms else a.new_zeros(0)


def per_sample_norm_sq(
    activations: torch.Tensor, grad_outputs: torch.Tensor, method: str | None = None
) -> torch.Tensor:
    """||G_i^T A_i||_F^2 for every sample i as computed by the backend (kernel or torch
    reference), float32 of shape (B,): an ESTIMATE, which cancellation can push far below the
    true value. Clipping must use ``certified_norm_sq`` / ``clipped_bound.clipped_weight_bound_sq``.
    """
    _check(activations, grad_outputs)
    batch, n_tokens, d_in = activations.shape
    d_out = grad_outputs.shape[2]
    if method is None:
        method = choose_method(batch, n_tokens, d_in, d_out)
    if method not in METHODS:
        raise ValueError(f"unknown per-sample norm method {method!r}; use one of {METHODS}")
    if batch == 0:
        return activations.new_zeros(0, dtype=torch.float32)
    if use_triton(activations, grad_outputs):
        from fastdp.kernels import per_sample_norm_triton

        return per_sample_norm_triton.per_sample_norm_sq(activations, grad_outputs, method)
    return per_sample_norm_sq_torch(activations, grad_outputs, method)
