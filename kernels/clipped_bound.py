"""What the clipped GEMM adds for a sample, as a certified bound per unit of clip factor.

The rules clip with these values: a sample's certified weight norm (certified_norm.py) plus
the rounding of the clipped GEMM's operands (``clipped_gemm_rounding``: c * g in float32, then
tf32 or bf16/fp16 operands) and of its reduction over a call of whole samples
(rounding.accumulation_excess), and the same for the bias gradient.
"""

from __future__ import annotations

import math

import torch

from fastdp.kernels.certified_norm import certified_weight_norm_sq
from fastdp.kernels.dispatch import use_triton
from fastdp.kernels.rounding import (
    U32,
    U64,
    _inflate,
    _tf32,
    accumulation_excess,
    frobenius_bounds,
    gamma,
    row_norms,
)


def clipped_gemm_rounding(
    activations: torch.Tensor, grad_outputs: torch.Tensor, triton: bool | None = None
) -> float:
    """rho: the clipped GEMM adds c G~^T A~ with |G~ - c G| <= ((1+u32)(1+u_g) - 1)|c G| and
    |A~ - A| <= u_a |A| (its operands, rounded: c * g in float32, then to the dot type), so
    ||c G~^T A~ - c G^T A||_F <= c rho S with S = sum_t ||a_t|| ||g_t||,
    rho = (1 + u32)(1 + u_g)(1 + u_a) - 1; the reduction's own rounding is
    rounding.accumulation_excess.

    torch path: float32 operands (tf32 on CUDA if allowed). Triton: both inputs of one 16-bit
    type -> c * g rounded to it (bf16 2^-8, fp16 2^-11), A exact; else float32/tf32.
    ``triton``: the backend decision if the caller has it (None: ask dispatch).
    """
    triton = use_triton(activations, grad_outputs) if triton is None else triton
    wide = not triton and activations.dtype == torch.float64  # reduced in float64 (torch path)
    u_g = u_a = 2.0**-11 if _tf32(activations.device) and not wide else 0.0
    if triton:
        half = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
        same = activations.dtype == grad_outputs.dtype
        if same and activations.dtype in half and activations.is_cuda:
            u_g, u_a = half[activations.dtype], 0.0
    return (1.0 + _scaling_unit(activations, triton)) * (1.0 + u_g) * (1.0 + u_a) - 1.0


def clipped_weight_bound_sq(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    method: str | None = None,
    rho: float | None = None,
) -> torch.Tensor:
    """(B,) float64 bound on ||G~_i^T A~_i||_F^2 / c_i^2, what the clipped GEMM adds per unit of
    clip factor: (sqrt(certified N_i) + rho S_i)^2; ``rho`` None: ``clipped_gemm_rounding``
    (a caller whose GEMM rounds its operands differently passes its own)."""
    triton = use_triton(activations, grad_outputs)  # once: it reads the environment
    norms, s = certified_weight_norm_sq(activations, grad_outputs, method, triton)
    if rho is None:
        rho = clipped_gemm_rounding(activations, grad_outputs, triton)
    root = norms.sqrt().add_(s, alpha=rho)
    u_acc = _accumulation_unit(activations, triton)
    root += accumulation_excess(root, s, activations.shape[1], u_acc)
    return root.square_().mul_(_inflate(4))


def _scaling_unit(tensor: torch.Tensor, triton: bool) -> float:
    """Unit roundoff of c * g: float64 inputs on the torch path are scaled in float64."""
    return U64 if not triton and tensor.dtype == torch.float64 else U32


def _accumulation_unit(tensor: torch.Tensor, triton: bool) -> float:
    """Unit roundoff of the clipped gradient's reduction: float64 inputs on the torch path are
    reduced in float64, else float32 (2^-23 on CUDA: tensor cores may truncate)."""
    if not triton and tensor.dtype == torch.float64:
        return U64
    return 2.0**-23 if tensor.is_cuda else U32


def clipped_bias_bound_sq(grad_outputs: torch.Tensor) -> torch.Tensor:
    """(B,) float64 bound on ||sum_t fl(c g_t)||^2 / c^2 for G (B, T, p): the bias gradient as
    both clipped GEMMs add it (c * g rounded once in float32, rho = u32). b = sum_t g_t is
    summed over blocks of 64 tokens in float32, then over blocks in float64 (error <=
    (gamma32_64 + gamma64_T) sum_t ||g_t||), so
    ||b_added|| / c <= ||b_hat|| (1 + gamma64) + (gamma32_64 + 2 gamma64_T + u32) M,
    M = sqrt(T) ||G||_F >= sum_t ||g_t|| (Cauchy-Schwarz; one read of G in memory order)."""
    n_tokens, d_out = grad_outputs.shape[1], grad_outputs.shape[2]
    n_all = n_tokens + d_out
    if n_tokens == 1:  # one term per sample: nothing of its own to cancel
        root = row_norms(grad_outputs).squeeze(1) * _inflate(n_all)
        u_scale = _scaling_unit(grad_outputs, use_triton(grad_outputs))
        return (root * (1.0 + u_scale)).square() * _inflate(4)
    mags = frobenius_bounds(grad_outputs)
    block = _BIAS_BLOCK if n_tokens > _BIAS_BLOCK else n_tokens
    summed = _block_sums(grad_outputs, block)  # float32 sums of <= block tokens
    if summed.shape[1] > 1:
        summed = summed.sum(1, dtype=torch.float64)
    else:
        summed = summed.squeeze(1)
    root = torch.linalg.vector_norm(summed, dim=1, dtype=torch.float64)
    u_w = U64 if grad_outputs.dtype == torch.float64 else U32
    u_scale = _scaling_unit(grad_outputs, use_triton(grad_outputs))
    slack = (gamma(block, u_w) + gamma(n_tokens, U64) * 2 + u_scale) * math.sqrt(n_tokens)
    inflate = _inflate(n_all)
    root = root.mul_(inflate).add_(mags, alpha=slack * inflate)
    u_acc = _accumulation_unit(grad_outputs, use_triton(grad_outputs))
    root += accumulation_excess(root, mags * math.sqrt(n_tokens), n_tokens, u_acc)
    return root.square_().mul_(_inflate(4))


_BIAS_BLOCK = 64


def _block_sums(tensor: torch.Tensor, block: int) -> torch.Tensor:
    """(B, n_blocks, p): sums over consecutive blocks of ``block`` tokens of (B, T, p), in the
    tensor's precision (float32 at least). Summing a whole long T in float64 instead costs a
    float64 copy of G (3 ns per element on CPU); a block sum is off by gamma_block sum |g|."""
    batch, n_tokens, d_out = tensor.shape
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    n_blocks = -(-n_tokens // block)
    if n_blocks == 1:
        return tensor.sum(1, keepdim=True)
    pad = n_blocks * block - n_tokens  # zero rows add nothing, exactly
    if pad:
        tensor = torch.nn.functional.pad(tensor, (0, 0, 0, pad))
    return tensor.reshape(batch, n_blocks, block, d_out).sum(2)
