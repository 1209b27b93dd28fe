"""Micro-benchmark: clipped weight gradient sum_i c_i G_i^T A_i vs torch.matmul.

Providers: "triton" (the fused kernel, CUDA only), "torch" (the reference: scale G, addmm into
the float64 accumulator) and "torch_matmul" (the plain GEMM G^T A over the B*T rows, cuBLAS on
CUDA: the target is to be within 10% of its time). FLOPs: 2 * B * T * d * p.
"""

from __future__ import annotations

import torch

from fastdp.bench.kernel_timing import measure, print_rows, rows_for, triton_runs_on
from fastdp.kernels import clipped_grad as cg

FULL = [(1024, 512, 1024, 1024), (256, 128, 4096, 1024), (4096, 1, 1024, 1024)]
QUICK_GPU = [(64, 128, 256, 256)]
QUICK_CPU = [(4, 32, 64, 64)]


def _shape_rows(shape: tuple[int, ...], device: torch.device, quick: bool) -> list[dict]:
    batch, n_tokens, d_in, d_out = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(batch, n_tokens, d_in, device=device, dtype=dtype)
    g = torch.randn(batch, n_tokens, d_out, device=device, dtype=dtype)
    scale = torch.rand(batch, device=device)
    out = torch.zeros(d_out, d_in, device=device)
    bias = torch.zeros(d_out, device=device)
    a2, g2 = a.reshape(-1, d_in), g.reshape(-1, d_out)
    providers = {
        "torch": lambda: cg.clipped_linear_grad_torch(a, g, scale, out, bias),
        "torch_matmul": lambda: torch.matmul(g2.t(), a2),
    }
    if triton_runs_on(device):
        from fastdp.kernels import clipped_grad_triton as kernel

        providers["triton"] = lambda: kernel.clipped_linear_grad(a, g, scale, out, bias)
    x = f"B={batch} T={n_tokens} d={d_in} p={d_out} {str(dtype)[6:]}"
    flops = 2.0 * batch * n_tokens * d_in * d_out
    rows = []
    for provider, fn in providers.items():
        seconds = measure(fn, device, quick)
        rows += rows_for("clipped_grad", provider, x, seconds, device, flops=flops)
    return rows


def run(quick: bool = False) -> list[dict]:
    """Rows for each shape (quick: one small shape)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (QUICK_GPU if device.type == "cuda" else QUICK_CPU) if quick else FULL
    return [row for shape in shapes for row in _shape_rows(shape, device, quick)]


if __name__ == "__main__":
    print_rows(run(quick=not torch.cuda.is_available()))
