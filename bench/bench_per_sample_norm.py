"""Micro-benchmark: per-sample squared norms (direct, ghost) vs the equivalent cuBLAS GEMMs.

Providers: "triton" (fused kernels, CUDA only), "torch" (the reference: bmm, then square and
sum), "torch_gemm" (cuBLAS on CUDA: only the batched GEMMs the norm needs, G_i^T A_i for
direct, A_i A_i^T and G_i G_i^T for ghost; the target is >= 70% of its TFLOP/s).
"""

from __future__ import annotations

import torch

from fastdp.bench.kernel_timing import measure, print_rows, rows_for, triton_runs_on
from fastdp.kernels import per_sample_norm as psn

FULL = [(1024, 512, 1024, 1024), (256, 64, 1024, 1024), (64, 2048, 768, 768)]
QUICK_GPU = [(64, 128, 256, 256)]
QUICK_CPU = [(4, 32, 64, 64)]


def _gemm_only(a: torch.Tensor, g: torch.Tensor, method: str) -> None:
    if method == "direct":
        torch.bmm(g.transpose(1, 2), a)
    else:
        torch.bmm(a, a.transpose(1, 2))
        torch.bmm(g, g.transpose(1, 2))


def _method_rows(a: torch.Tensor, g: torch.Tensor, method: str, quick: bool) -> list[dict]:
    batch, n_tokens, d_in = a.shape
    d_out = g.shape[2]
    flops_fn = psn.direct_flops if method == "direct" else psn.ghost_flops
    x = f"{method} B={batch} T={n_tokens} d={d_in} p={d_out} {str(a.dtype)[6:]}"
    providers = {
        "torch": lambda: psn.per_sample_norm_sq_torch(a, g, method),
        "torch_gemm": lambda: _gemm_only(a, g, method),
    }
    if triton_runs_on(a.device):
        from fastdp.kernels import per_sample_norm_triton as kernel

        providers["triton"] = lambda: kernel.per_sample_norm_sq(a, g, method)
    rows = []
    for provider, fn in providers.items():
        seconds = measure(fn, a.device, quick)
        rows += rows_for("per_sample_norm", provider, x, seconds, a.device,
                         flops=flops_fn(batch, n_tokens, d_in, d_out))  # fmt: skip
    return rows


def run(quick: bool = False) -> list[dict]:
    """Rows for the direct and ghost kernels at each shape (quick: one small shape)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = (QUICK_GPU if device.type == "cuda" else QUICK_CPU) if quick else FULL
    rows: list[dict] = []
    for batch, n_tokens, d_in, d_out in shapes:
        a = torch.randn(batch, n_tokens, d_in, device=device, dtype=dtype)
        g = torch.randn(batch, n_tokens, d_out, device=device, dtype=dtype)
        for method in ("direct", "ghost"):
            rows += _method_rows(a, g, method, quick)
    return rows


if __name__ == "__main__":
    print_rows(run(quick=not torch.cuda.is_available()))
