"""Block sizes, warps and split factors for every kernel, in one place.

Each helper takes sizes only (never strides or eps) and returns a small frozen config, so a
kernel is compiled once per size bucket. Under the interpreter (TRITON_INTERPRET=1, CPU) the
blocks are the smallest ``tl.dot`` accepts (16): the tests then cover several tiles and
masked edges at tiny shapes, and numpy runs fewer wasted lanes.

GPU numbers are starting points for Hopper (H100/H200, 132 SMs): a 128 x 128 output tile with
a 64-deep K step does 2 * 128 * 128 * 64 = 2.1 MFLOP per (128 + 128) * 64 * 2 B = 32 KiB of
bf16 loaded (64 FLOP/B per step), and its fp32 accumulator (64 KiB) fits the registers of 8
warps. Programs run sample-major, so tiles of one sample reuse its rows from L2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastdp.kernels.dispatch import interpreter_enabled


@dataclass(frozen=True)
class TileConfig:
    """Tile shape of a GEMM-like kernel: an (m, n) output tile stepped over k."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class ElementwiseConfig:
    """Elements per program of a memory-bound kernel."""

    block: int
    num_warps: int = 4


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreter_enabled()


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (used to size split-K)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def norm_direct_config(d_in: int, d_out: int, device: torch.device) -> TileConfig:
    """(p, d) tile of G_i^T A_i per program, stepped over T; m = p, n = d, k = T."""
    if not _on_gpu(device):
        return TileConfig(16, 16, 16)
    block_m = 128 if d_out >= 128 else 64
    block_n = 128 if d_in >= 128 else 64
    return TileConfig(block_m, block_n, 64, num_warps=8, num_stages=3)


def norm_ghost_config(n_tokens: int, device: torch.device) -> TileConfig:
    """(T, T) Gram tile pair per program; m = n = token block, k = feature step."""
    if not _on_gpu(device):
        return TileConfig(16, 16, 16)
    block_t = 64 if n_tokens >= 64 else 32 if n_tokens > 16 else 16
    return TileConfig(block_t, block_t, 64, num_warps=4, num_stages=3)


def clipped_grad_config(d_out: int, d_in: int, device: torch.device) -> TileConfig:
    """(p, d) output tile per program, stepped over the B*T rows; m = p, n = d, k = rows."""
    if not _on_gpu(device):
        return TileConfig(16, 16, 16)
    block_m = 128 if d_out >= 128 else 64
    block_n = 128 if d_in >= 128 else 64
    return TileConfig(block_m, block_n, 64, num_warps=8, num_stages=3)


def split_k(n_tiles: int, n_rows: int, block_k: int, device: torch.device) -> int:
    """How many programs share one output tile's K range (partials reduced in a second pass).

    Enough to give every SM two programs, but each split keeps >= 16 K-steps so the fp32
    partial (4 bytes per output element per split) stays small next to the inputs read.
    """
    if not _on_gpu(device):
        return 2 if n_rows >= 4 * block_k else 1
    target = -(-2 * sm_count(device.index or 0) // max(n_tiles, 1))
    most = max(1, n_rows // (16 * block_k))
    return max(1, min(target, most, 64))


def update_config(device: torch.device) -> ElementwiseConfig:
    """Elements per program of the multi-tensor update (a multiple of 4: noise comes in 4s)."""
    if not _on_gpu(device):
        return ElementwiseConfig(64)
    return ElementwiseConfig(2048, num_warps=8)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for float32 inputs, following torch's own matmul setting."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
