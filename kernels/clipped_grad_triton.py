"""Triton kernels for the clipped weight gradient sum_i c_i G_i^T A_i (+ noise).

One GEMM with K = B*T rows: each program owns a (p, d) tile of ``out`` and steps over its share
of the rows, loading G's rows already multiplied by their sample's c (in float32, then cast to
the dot type), so the scaled G is never written. The bias gradient sum_r c_r g_r is reduced
from the same G loads by the programs of the first column of tiles.

Split-K: a (1024, 1024) weight is only 64 tiles of 128 x 128 for 132 SMs, so the rows are split
across S programs per tile, each writing a float32 partial; a second, elementwise pass adds the
S partials, the existing ``out`` and the noise. It moves 8*S*p*d bytes (S = 4: 32 MiB for
p = d = 1024) against 2*B*T*(p + d) bytes of bf16 inputs (2 GiB at B = 1024, T = 512), and keeps
the sum deterministic (no float atomics). With S = 1 the GEMM's own epilogue does it.

Noise: N(0, noise_std^2) from Philox, ``tl.randn(key, row * d + col)`` with
key = mix_key(seed, step, stream) (stream + 2**32 for the bias, as in the torch reference). The
offset is the logical element index, so the noise does not depend on tiles or S. Offsets are
int32 (p * d < 2**31 is checked): Philox then runs on 32-bit counters, which Triton >= 3.1 and
3.9 treat alike, so the noise is the same across versions (int64 offsets switch to 64-bit
Philox in older Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.kernels import config
from fastdp.kernels.noise import mix_key
from fastdp.kernels.triton_utils import check_same_device, dot_dtype, to_int64


@triton.jit
def _clipped_grad_kernel(
    a_ptr,
    g_ptr,
    scale_ptr,
    out_ptr,
    bias_ptr,
    work_ptr,
    work_bias_ptr,
    n_tokens,
    n_rows,
    d_in,
    d_out,
    n_tiles_d,
    rows_per_split,
    stride_a_batch,
    stride_a_token,
    stride_a_feat,
    stride_g_batch,
    stride_g_token,
    stride_g_feat,
    stride_out_row,
    stride_out_col,
    stride_bias,
    noise_std,
    weight_key,
    bias_key,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile (p-block, d-block) of sum_r c_r g_r a_r^T over rows [split * rows_per_split, ...).

    a_ptr: A (B, T, d), g_ptr: G (B, T, p), float32/bfloat16/float16; scale_ptr: (B,) float32;
    out_ptr: (p, d) float32; bias_ptr: (p,) float32. WRITE_PARTIAL: work_ptr (S, p, d) and
    work_bias_ptr (S, p) float32 contiguous receive this split's sums instead (no noise);
    otherwise out (+ bias) += sums + noise_std * randn(key, logical index).
    """
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1).to(tl.int64)
    tile_p = pid_tile // n_tiles_d
    tile_d = pid_tile % n_tiles_d
    offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < d_out
    mask_d = offs_d < d_in
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    for r0 in range(row_start, row_end, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_r = offs_r < row_end
        sample = offs_r // n_tokens
        token = offs_r - sample * n_tokens
        g_rows = sample * stride_g_batch + token * stride_g_token
        a_rows = sample * stride_a_batch + token * stride_a_token
        g_t = tl.load(  # (BLOCK_P, BLOCK_K): G^T through its strides
            g_ptr + offs_p[:, None] * stride_g_feat + g_rows[None, :],
            mask=mask_p[:, None] & mask_r[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_SCALE:
            c = tl.load(scale_ptr + sample, mask=mask_r, other=0.0)
            g_t = g_t * c[None, :]
        if HAS_BIAS:
            bias_acc += tl.sum(g_t, axis=1)
        a = tl.load(
            a_ptr + a_rows[:, None] + offs_d[None, :] * stride_a_feat,
            mask=mask_r[:, None] & mask_d[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        acc = tl.dot(g_t.to(DOT_DTYPE), a, acc, input_precision=INPUT_PRECISION)
    mask = mask_p[:, None] & mask_d[None, :]
    mask_bias = offs_p < tl.where(tile_d == 0, d_out, 0)  # bias: first column of tiles only
    if WRITE_PARTIAL:
        work = work_ptr + pid_split * d_out * d_in
        tl.store(work + offs_p[:, None] * d_in + offs_d[None, :], acc, mask=mask)
        if HAS_BIAS:
            tl.store(work_bias_ptr + pid_split * d_out + offs_p, bias_acc, mask=mask_bias)
    else:
        if ADD_NOISE:
            index = offs_p[:, None] * d_in + offs_d[None, :]  # < 2**31: checked on the host
            acc += noise_std * tl.randn(weight_key, index.to(tl.int32))
        out = out_ptr + offs_p[:, None] * stride_out_row + offs_d[None, :] * stride_out_col
        tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)
        if HAS_BIAS:
            if ADD_NOISE:
                bias_acc += noise_std * tl.randn(bias_key, offs_p.to(tl.int32))
            bias = bias_ptr + offs_p * stride_bias
            tl.store(bias, tl.load(bias, mask=mask_bias, other=0.0) + bias_acc, mask=mask_bias)


@triton.jit
def _split_reduce_kernel(
    work_ptr,
    out_ptr,
    n_split,
    n_rows,
    n_cols,
    stride_out_row,
    stride_out_col,
    noise_std,
    key,
    ADD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[r, c] += sum_s work[s, r, c] (+ noise_std * randn(key, r * n_cols + c)).

    work_ptr: (S, n_rows, n_cols) float32 contiguous (S may be 0); out_ptr: (n_rows, n_cols)
    float32 with strides (a bias is n_rows = 1).
    """
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_elements = n_rows.to(tl.int64) * n_cols
    mask = index < n_elements
    row = index // n_cols
    col = index - row * n_cols
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n_split):
        total += tl.load(work_ptr + s * n_elements + index, mask=mask, other=0.0)
    if ADD_NOISE:
        total += noise_std * tl.randn(key, index.to(tl.int32))
    out = out_ptr + row * stride_out_row + col * stride_out_col
    tl.store(out, tl.load(out, mask=mask, other=0.0) + total, mask=mask)


def _reduce(
    work: torch.Tensor, out2d: torch.Tensor, n_split: int, noise_std: float, key: int
) -> None:
    n_rows, n_cols = out2d.shape
    block = 1024 if out2d.is_cuda else 256
    grid = (triton.cdiv(n_rows * n_cols, block),)
    _split_reduce_kernel[grid](
        work, out2d, n_split, n_rows, n_cols, out2d.stride(0), out2d.stride(1),
        float(noise_std), key, ADD_NOISE=noise_std > 0, BLOCK=block,
    )  # fmt: skip


def clipped_linear_grad(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    scale: torch.Tensor | None,
    out: torch.Tensor,
    bias_out: torch.Tensor | None = None,
    *,
    noise_std: float = 0.0,
    seed: int = 0,
    step: int = 0,
    stream: int = 0,
) -> None:
    """out += sum_i scale_i G_i^T A_i (+ noise); bias_out += sum_i scale_i sum_t G_it (+ noise).

    A: (B, T, d), G: (B, T, p), float32/bfloat16/float16, any strides; scale: (B,) any float
    dtype or None; out: (p, d) float32; bias_out: (p,) float32 or None. Shapes are checked by
    the dispatcher (clipped_grad.py).
    """
    tensors = [activations, grad_outputs, out] + [t for t in (scale, bias_out) if t is not None]
    device = check_same_device(*tensors)
    batch, n_tokens, d_in = activations.shape
    d_out = grad_outputs.shape[2]
    n_rows = batch * n_tokens
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    weight_key = to_int64(mix_key(seed, step, stream))
    bias_key = to_int64(mix_key(seed, step, stream + (1 << 32)))
    if d_in == 0 or d_out == 0:
        return
    if d_out * d_in >= 1 << 31:
        raise ValueError(
            f"a ({d_out}, {d_in}) weight has too many elements for int32 noise offsets"
        )
    if n_rows == 0:  # nothing to sum: only the noise, once
        if noise_std > 0:
            empty = torch.empty(0, dtype=torch.float32, device=device)
            _reduce(empty, out, 0, noise_std, weight_key)
            if bias_out is not None:
                _reduce(empty, bias_out.view(1, d_out), 0, noise_std, bias_key)
        return
    cfg = config.clipped_grad_config(d_out, d_in, device)
    n_tiles_d = triton.cdiv(d_in, cfg.block_n)
    n_tiles = triton.cdiv(d_out, cfg.block_m) * n_tiles_d
    n_split = config.split_k(n_tiles, n_rows, cfg.block_k, device)
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, n_split), cfg.block_k) * cfg.block_k
    n_split = triton.cdiv(n_rows, rows_per_split)
    if n_split > 1:
        work = torch.empty(n_split, d_out, d_in, dtype=torch.float32, device=device)
        work_bias = torch.empty(n_split, d_out, dtype=torch.float32, device=device)
    else:
        work = work_bias = out  # unused
    scale_f32 = scale.float().contiguous() if scale is not None else out
    bias_arg = bias_out if bias_out is not None else out
    _clipped_grad_kernel[(n_tiles, n_split)](
        activations, grad_outputs, scale_f32, out, bias_arg, work, work_bias,
        n_tokens, n_rows, d_in, d_out, n_tiles_d, rows_per_split,
        *activations.stride(), *grad_outputs.stride(), *out.stride(), bias_arg.stride(0),
        float(noise_std), weight_key, bias_key,
        HAS_SCALE=scale is not None, HAS_BIAS=bias_out is not None, WRITE_PARTIAL=n_split > 1,
        ADD_NOISE=noise_std > 0,        DOT_DTYPE=dot_dtype(activations.dtype, grad_outputs.dtype),
        INPUT_PRECISION=config.dot_precision(activations.dtype),
        BLOCK_P=cfg.block_m, BLOCK_D=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if n_split > 1:
        _reduce(work, out, n_split, noise_std, weight_key)
        if bias_out is not None:
            _reduce(work_bias, bias_out.view(1, d_out), n_split, noise_std, bias_key)
