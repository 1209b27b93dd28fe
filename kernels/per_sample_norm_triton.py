"""Triton kernels for per-sample squared norms ||G_i^T A_i||_F^2 (reference: per_sample_norm.py).

direct: one program per (sample i, (p, d) output tile); the tile of G_i^T A_i is accumulated
over T in registers, squared and summed, and only that scalar leaves the program. Splitting T
across programs would need the un-squared tile in memory (the per-sample gradient, 4*p*d B per
sample), so T stays inside a program and the B * tiles programs give the parallelism.

ghost: one program per (sample i, pair of token blocks (t, s) with s >= t); the Gram tiles
A_t A_s^T and G_t G_s^T are accumulated over d and p in registers, multiplied elementwise and
summed (off-diagonal pairs count twice: both Grams are symmetric), so no T x T matrix is written
and long T is split across the T^2 / 2 pair programs.

Both write one float32 partial per program into a (B, n_programs_per_sample) buffer that a
second pass sums: deterministic, unlike float atomics, for 4 bytes per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.kernels import config
from fastdp.kernels.triton_utils import check_same_device, dot_dtype, tl_dtype


@triton.jit
def _norm_direct_kernel(
    a_ptr,
    g_ptr,
    partial_ptr,
    n_tokens,
    d_in,
    d_out,
    n_tiles_d,
    n_tiles,
    stride_a_batch,
    stride_a_token,
    stride_a_feat,
    stride_g_batch,
    stride_g_token,
    stride_g_feat,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """partial[i, tile] = sum over the tile of (G_i^T A_i)^2.

    a_ptr: A (B, T, d) float32/bfloat16/float16; g_ptr: G (B, T, p), same kinds;
    partial_ptr: (B, n_tiles) float32, n_tiles = ceil(p / BLOCK_P) * ceil(d / BLOCK_D).
    """
    pid = tl.program_id(0).to(tl.int64)
    sample = pid // n_tiles
    tile = pid % n_tiles
    offs_p = (tile // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = (tile % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < d_out
    mask_d = offs_d < d_in
    a_base = a_ptr + sample * stride_a_batch
    g_base = g_ptr + sample * stride_g_batch
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_tokens
        g_t = tl.load(  # (BLOCK_P, BLOCK_T): G_i^T read through its strides
            g_base + offs_p[:, None] * stride_g_feat + offs_t[None, :] * stride_g_token,
            mask=mask_p[:, None] & mask_t[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        a = tl.load(
            a_base + offs_t[:, None] * stride_a_token + offs_d[None, :] * stride_a_feat,
            mask=mask_t[:, None] & mask_d[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        acc = tl.dot(g_t, a, acc, input_precision=INPUT_PRECISION)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _gram_tile(
    base,
    offs_t,
    offs_s,
    n_tokens,
    n_feat,
    stride_token,
    stride_feat,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """X_t X_s^T for the token blocks offs_t, offs_s of one sample, float32 (BLOCK_T, BLOCK_T)."""
    mask_t = offs_t < n_tokens
    mask_s = offs_s < n_tokens
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, n_feat, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n_feat
        x_t = tl.load(
            base + offs_t[:, None] * stride_token + offs_k[None, :] * stride_feat,
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        x_s = tl.load(  # (BLOCK_K, BLOCK_T): X_s^T read through its strides
            base + offs_k[:, None] * stride_feat + offs_s[None, :] * stride_token,
            mask=mask_k[:, None] & mask_s[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        acc = tl.dot(x_t, x_s, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _norm_ghost_kernel(
    a_ptr,
    g_ptr,
    pairs_ptr,
    partial_ptr,
    n_tokens,
    d_in,
    d_out,
    n_pairs,
    stride_a_batch,
    stride_a_token,
    stride_a_feat,
    stride_g_batch,
    stride_g_token,
    stride_g_feat,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """partial[i, q] = w_q * sum((A_t A_s^T) * (G_t G_s^T)) for token-block pair q = (t, s).

    a_ptr: A (B, T, d), g_ptr: G (B, T, p), float32/bfloat16/float16; pairs_ptr: (n_pairs, 2)
    int32 token-block pairs with s >= t; partial_ptr: (B, n_pairs) float32; w = 2 if s > t.
    """
    pid = tl.program_id(0).to(tl.int64)
    sample = pid // n_pairs
    pair = pid % n_pairs
    block_t = tl.load(pairs_ptr + 2 * pair)
    block_s = tl.load(pairs_ptr + 2 * pair + 1)
    offs_t = block_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = block_s * BLOCK_T + tl.arange(0, BLOCK_T)
    gram_a = _gram_tile(
        a_ptr + sample * stride_a_batch, offs_t, offs_s, n_tokens, d_in,
        stride_a_token, stride_a_feat, DOT_DTYPE, INPUT_PRECISION, BLOCK_T, BLOCK_K,
    )  # fmt: skip
    gram_g = _gram_tile(
        g_ptr + sample * stride_g_batch, offs_t, offs_s, n_tokens, d_out,
        stride_g_token, stride_g_feat, DOT_DTYPE, INPUT_PRECISION, BLOCK_T, BLOCK_K,
    )  # fmt: skip
    weight = tl.where(block_s > block_t, 2.0, 1.0)
    tl.store(partial_ptr + pid, weight * tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0))


_PAIRS_CACHE: dict[tuple[int, str, int | None], torch.Tensor] = {}


def _block_pairs(n_blocks: int, device: torch.device) -> torch.Tensor:
    """(n_blocks * (n_blocks + 1) / 2, 2) int32 upper-triangle block pairs, cached per device."""
    key = (n_blocks, device.type, device.index)
    if key not in _PAIRS_CACHE:
        rows, cols = torch.triu_indices(n_blocks, n_blocks)
        _PAIRS_CACHE[key] = torch.stack([rows, cols], 1).to(torch.int32).contiguous().to(device)
    return _PAIRS_CACHE[key]


def per_sample_norm_sq(
    activations: torch.Tensor, grad_outputs: torch.Tensor, method: str
) -> torch.Tensor:
    """Launch the ``method`` ("direct" or "ghost") kernel; returns (B,) float32 norms squared.

    A: (B, T, d), G: (B, T, p), float32/bfloat16/float16, any strides (no copies are made).
    """
    if activations.dim() != 3 or grad_outputs.dim() != 3:
        raise ValueError("per_sample_norm_sq needs A (B, T, d) and G (B, T, p)")
    device = check_same_device(activations, grad_outputs)
    batch, n_tokens, d_in = activations.shape
    d_out = grad_outputs.shape[2]
    for dtype in (activations.dtype, grad_outputs.dtype):
        tl_dtype(dtype)  # a clear error for unsupported dtypes
    spec = config.device_spec(device)
    operand = config.operand_dtype(activations.dtype, grad_outputs.dtype)
    precision = config.dot_precision(operand)
    if batch == 0 or n_tokens == 0 or d_in == 0 or d_out == 0:
        return torch.zeros(batch, dtype=torch.float32, device=device)
    strides = (*activations.stride(), *grad_outputs.stride())
    if method == "direct":
        cfg = config.norm_direct_config(d_in, d_out, operand, spec)
        n_tiles_d = triton.cdiv(d_in, cfg.block_n)
        n_tiles = triton.cdiv(d_out, cfg.block_m) * n_tiles_d
        partial = torch.empty(batch, n_tiles, dtype=torch.float32, device=device)
        _norm_direct_kernel[(batch * n_tiles,)](
            activations, grad_outputs, partial, n_tokens, d_in, d_out, n_tiles_d, n_tiles,
            *strides, DOT_DTYPE=dot_dtype(operand), INPUT_PRECISION=precision, BLOCK_P=cfg.block_m,
            BLOCK_D=cfg.block_n, BLOCK_T=cfg.block_k, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
    elif method == "ghost":
        cfg = config.norm_ghost_config(n_tokens, operand, spec)
        pairs = _block_pairs(triton.cdiv(n_tokens, cfg.block_m), device)
        n_pairs = pairs.shape[0]
        partial = torch.empty(batch, n_pairs, dtype=torch.float32, device=device)
        _norm_ghost_kernel[(batch * n_pairs,)](
            activations, grad_outputs, pairs, partial, n_tokens, d_in, d_out, n_pairs,
            *strides, DOT_DTYPE=dot_dtype(operand), INPUT_PRECISION=precision, BLOCK_T=cfg.block_m,
            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown per-sample norm method {method!r}; use 'ghost' or 'direct'")
    return partial.sum(1)
