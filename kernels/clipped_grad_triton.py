"""Triton kernels for the clipped weight gradient sum_i c_i G_i^T A_i (reference: clipped_grad.py).

One GEMM with K = B*T rows: each program owns a (p, d) tile of ``out`` and steps over its share
of the rows, loading G's rows already multiplied by their sample's c (in float32, then cast to
the dot type), so the scaled G is never written. The bias gradient sum_r c_r g_r is reduced
from the same G loads by the programs of the first column of tiles. Noise is not added here:
the optimizer's update adds it once per logical batch (noisy_update_triton.py).

Split-K: a (768, 768) weight is only 36 tiles of 128 x 128 for 132 SMs, so the rows are split
across S programs per tile (``config.clipped_grad_plan`` picks S from the occupancy), each
writing a float32 partial; a second, elementwise pass adds the S partials to ``out``. It moves
8*S*p*d bytes (S = 22: 104 MiB for p = d = 768) against 2*B*T*(p + d) bytes of bf16 inputs
(192 MiB at B = 64, T = 1024) and keeps the sum deterministic (no float atomics). With S = 1 the
GEMM's own epilogue adds into ``out``.

Tensor cores: operands are the inputs' common 16-bit type (bf16/fp16 MMA) or float32 with
``input_precision`` "tf32" when torch.backends.cuda.matmul.allow_tf32 is set, else "ieee"
(FMA units, a smaller tile: see config.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.kernels import config
from fastdp.kernels.triton_utils import check_same_device, dot_dtype, tl_dtype


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
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile (p-block, d-block) of sum_r c_r g_r a_r^T over rows [split * rows_per_split, ...).

    a_ptr: A (B, T, d), g_ptr: G (B, T, p), float32/bfloat16/float16; scale_ptr: (B,) float32;
    out_ptr: (p, d) float32; bias_ptr: (p,) float32. WRITE_PARTIAL: work_ptr (S, p, d) and
    work_bias_ptr (S, p) float32 contiguous receive this split's sums instead; otherwise
    out (+ bias) += sums.
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
        )
        if HAS_SCALE:
            c = tl.load(scale_ptr + sample, mask=mask_r, other=0.0)
            g_t = g_t.to(tl.float32) * c[None, :]
        if HAS_BIAS:
            bias_acc += tl.sum(g_t.to(tl.float32), axis=1)
        a = tl.load(
            a_ptr + a_rows[:, None] + offs_d[None, :] * stride_a_feat,
            mask=mask_r[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = tl.dot(g_t.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    mask = mask_p[:, None] & mask_d[None, :]
    mask_bias = offs_p < tl.where(tile_d == 0, d_out, 0)  # bias: first column of tiles only
    if WRITE_PARTIAL:
        work = work_ptr + pid_split * d_out * d_in
        tl.store(work + offs_p[:, None] * d_in + offs_d[None, :], acc, mask=mask)
        if HAS_BIAS:
            tl.store(work_bias_ptr + pid_split * d_out + offs_p, bias_acc, mask=mask_bias)
    else:
        out = out_ptr + offs_p[:, None] * stride_out_row + offs_d[None, :] * stride_out_col
        tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)
        if HAS_BIAS:
            bias = bias_ptr + offs_p * stride_bias
            tl.store(bias, tl.load(bias, mask=mask_bias, other=0.0) + bias_acc, mask=mask_bias)


@triton.jit
def _split_reduce_kernel(
    work_ptr,
    out_ptr,
    n_split,
    n_elements,
    n_cols,
    stride_out_row,
    stride_out_col,
    OUT_CONTIGUOUS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[r, c] += sum_s work[s, r, c].

    work_ptr: (S, n_rows, n_cols) float32 contiguous; out_ptr: (n_rows, n_cols) float32 with
    strides (a bias is n_rows = 1). n_elements = n_rows * n_cols, computed on the host: every
    integer argument here may be specialised to the constant 1 by Triton, so none is cast.
    OUT_CONTIGUOUS: out is row-major contiguous (then loads and stores are 16-byte vectors).
    """
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_elements
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    work = work_ptr + index
    for _ in range(0, n_split):
        total += tl.load(work, mask=mask, other=0.0)
        work += n_elements
    if OUT_CONTIGUOUS:
        out = out_ptr + index
    else:
        row = index // n_cols
        out = out_ptr + row * stride_out_row + (index - row * n_cols) * stride_out_col
    tl.store(out, tl.load(out, mask=mask, other=0.0) + total, mask=mask)


def _reduce(work: torch.Tensor, out2d: torch.Tensor, spec: config.DeviceSpec | None) -> None:
    n_rows, n_cols = out2d.shape
    cfg = config.reduce_config(spec)
    grid = (triton.cdiv(n_rows * n_cols, cfg.block),)
    contiguous = out2d.stride(1) == 1 and (n_rows == 1 or out2d.stride(0) == n_cols)
    _split_reduce_kernel[grid](
        work, out2d, work.shape[0], n_rows * n_cols, n_cols, out2d.stride(0), out2d.stride(1),
        OUT_CONTIGUOUS=contiguous, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip


def clipped_linear_grad(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    scale: torch.Tensor | None,
    out: torch.Tensor,
    bias_out: torch.Tensor | None = None,
) -> None:
    """out += sum_i scale_i G_i^T A_i; bias_out += sum_i scale_i sum_t G_it.

    A: (B, T, d), G: (B, T, p), float32/bfloat16/float16, any strides; scale: (B,) any float
    dtype or None; out: (p, d) float32; bias_out: (p,) float32 or None. Shapes are checked by
    the dispatcher (clipped_grad.py).
    """
    tensors = [activations, grad_outputs, out] + [t for t in (scale, bias_out) if t is not None]
    device = check_same_device(*tensors)
    batch, n_tokens, d_in = activations.shape
    d_out = grad_outputs.shape[2]
    n_rows = batch * n_tokens
    if d_in == 0 or d_out == 0 or n_rows == 0:
        return
    for dtype in (activations.dtype, grad_outputs.dtype):
        tl_dtype(dtype)  # a clear error for unsupported dtypes
    spec = config.device_spec(device)
    operand = config.operand_dtype(activations.dtype, grad_outputs.dtype)
    plan = config.clipped_grad_plan(d_out, d_in, n_rows, operand, spec)
    tile = plan.tile
    n_tiles_d = triton.cdiv(d_in, tile.block_n)
    if plan.n_split > 1:
        work = torch.empty(plan.n_split, d_out, d_in, dtype=torch.float32, device=device)
        work_bias = torch.empty(plan.n_split, d_out, dtype=torch.float32, device=device)
    else:
        work = work_bias = out  # unused
    scale_f32 = scale.float().contiguous() if scale is not None else out
    bias_arg = bias_out if bias_out is not None else out
    _clipped_grad_kernel[(plan.n_tiles, plan.n_split)](
        activations, grad_outputs, scale_f32, out, bias_arg, work, work_bias,
        n_tokens, n_rows, d_in, d_out, n_tiles_d, plan.rows_per_split,
        *activations.stride(), *grad_outputs.stride(), *out.stride(), bias_arg.stride(0),
        HAS_SCALE=scale is not None, HAS_BIAS=bias_out is not None,
        WRITE_PARTIAL=plan.n_split > 1, DOT_DTYPE=dot_dtype(operand),
        INPUT_PRECISION=config.dot_precision(operand),
        BLOCK_P=tile.block_m, BLOCK_D=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    if plan.n_split > 1:
        _reduce(work, out, spec)
        if bias_out is not None:
            _reduce(work_bias, bias_out.view(1, d_out), spec)
