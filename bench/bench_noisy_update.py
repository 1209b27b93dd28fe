"""Micro-benchmark: multi-tensor noisy SGD (momentum) / AdamW update vs memory bandwidth.

Providers: "triton" (one fused launch per dtype group, CUDA only), "torch" (the reference: a
loop of per-tensor ops), "torch_foreach" (the same update with torch._foreach_* ops, noise
off: what torch.optim does on CUDA) and "copy" (a device memory copy moving the same number
of bytes: the bandwidth ceiling). Bytes moved per float32 element: SGD with momentum reads
grad, param, buffer and writes param, buffer = 20 B; AdamW reads 4 and writes 3 = 28 B.
The target is >= 80% of the device's memory bandwidth.
"""

from __future__ import annotations

import torch

from fastdp.bench.kernel_timing import measure, print_rows, rows_for, triton_runs_on
from fastdp.kernels import noisy_update as nu
from fastdp.kernels.noise import NoiseKey, derive_secret

BYTES_PER_ELEMENT = {"sgd_momentum": 20, "adamw": 28}
# A GPT-2-small-like parameter list (embedding, 12 blocks of 4 matrices plus vectors).
FULL = [(50257, 768)] + [(768, 768)] * 24 + [(3072, 768)] * 24 + [(768,)] * 72
QUICK_GPU = [(4096, 256)] * 4 + [(256,)] * 8
QUICK_CPU = [(256, 64)] * 4 + [(64,)] * 8


def _foreach_sgd(params, grads, bufs, lr=0.1, momentum=0.9):
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    torch._foreach_add_(params, bufs, alpha=-lr)


def _foreach_adamw(params, grads, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    torch._foreach_mul_(params, 1 - lr * 0.01)
    torch._foreach_lerp_(m, grads, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, -lr)


def _copy_of(n_bytes: int, device: torch.device):
    """A device copy that reads and writes n_bytes / 2 each (the bandwidth ceiling)."""
    src = torch.empty(n_bytes // 8, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def run(quick: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (QUICK_GPU if device.type == "cuda" else QUICK_CPU) if quick else FULL
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    bufs = [torch.zeros(s, device=device) for s in shapes]
    exp_avg_sq = [torch.zeros(s, device=device) for s in shapes]
    n_elements = sum(p.numel() for p in params)
    x = f"{len(shapes)} tensors {n_elements / 1e6:.1f}M float32"
    key = dict(noise=NoiseKey(derive_secret(0), 0, 1.0), scale=1e-3)
    sgd = dict(lr=0.1, momentum=0.9, **key)
    adamw = dict(step_count=1, lr=1e-3, **key)
    rows: list[dict] = []
    for op, nbytes in BYTES_PER_ELEMENT.items():
        moved = nbytes * n_elements
        copy = _copy_of(moved, device)
        if op == "sgd_momentum":
            providers = {
                "torch": lambda: nu.noisy_sgd_update_torch(params, grads, bufs, **sgd),
                "torch_foreach": lambda: _foreach_sgd(params, grads, bufs),
            }
        else:
            providers = {
                "torch": lambda: nu.noisy_adamw_update_torch(
                    params, grads, bufs, exp_avg_sq, **adamw
                ),
                "torch_foreach": lambda: _foreach_adamw(params, grads, bufs, exp_avg_sq),
            }
        providers["copy"] = copy
        if triton_runs_on(device):
            from fastdp.kernels import noisy_update_triton as nut

            if op == "sgd_momentum":
                providers["triton"] = lambda: nut.noisy_sgd_update(params, grads, bufs, **sgd)
            else:
                providers["triton"] = lambda: nut.noisy_adamw_update(
                    params, grads, bufs, exp_avg_sq, **adamw
                )
        for provider, fn in providers.items():
            seconds = measure(fn, device, quick)
            rows += rows_for(f"noisy_update_{op}", provider, x, seconds, device,
                             bytes_moved=moved)  # fmt: skip
    return rows


if __name__ == "__main__":
    print_rows(run(quick=not torch.cuda.is_available()))
