"""Micro-benchmark: CPU Gaussian noise, ns per float32 value (Philox vs torch's mt19937).

Providers: "torch_randn" (torch.randn with a seeded torch.Generator, mt19937, one thread: the
generator fastdp used before, keyed by 32 bits), "philox" (kernels/noise.py: compiled Philox,
numpy Box-Muller, two threads), "philox_1thread" (the same on one thread) and "philox_numpy"
(Philox in numpy, the path without a C compiler, one thread). The target: "philox" no slower
than "torch_randn". On CUDA the noise is drawn inside the update kernel (bench_noisy_update).
"""

from __future__ import annotations

import numpy as np
import torch

from fastdp.bench.kernel_timing import measure, print_rows, rows_for
from fastdp.kernels import noise

FULL = [1 << 22, 1 << 24]
QUICK = [1 << 20]


def _one_thread(n: int, secret: int, numpy_only: bool):
    blocks, chunk = (n + 1) // 2, noise._CHUNK_BLOCKS
    inputs = noise.box_muller_inputs_numpy if numpy_only else noise.box_muller_inputs

    def draw():
        out = np.empty((blocks, 2), dtype=np.float32)
        for start in range(0, blocks, chunk):
            u1, u2 = inputs(secret, 0, 0, start, min(chunk, blocks - start))
            noise.box_muller(u1, u2, out[start : start + len(u1)])
        return out

    return draw


def _torch_randn(n: int):
    generator = torch.Generator().manual_seed(0)

    def draw():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.randn(n, generator=generator)
        finally:
            torch.set_num_threads(threads)

    return draw


def run(quick: bool = False) -> list[dict]:
    device = torch.device("cpu")
    secret = noise.derive_secret(0)
    rows: list[dict] = []
    for n in QUICK if quick else FULL:
        providers = {
            "torch_randn": _torch_randn(n),
            "philox": lambda n=n: noise._draw((n,), secret, 0, 0),
            "philox_1thread": _one_thread(n, secret, numpy_only=False),
            "philox_numpy": _one_thread(n, secret, numpy_only=True),
        }
        x = f"{n / 2**20:g}M float32"
        for provider, fn in providers.items():
            seconds = measure(fn, device, quick)
            rows += rows_for("noise_cpu", provider, x, seconds, device)
            ns = [s / n * 1e9 for s in seconds]
            rows.append(dict(rows[-1], metric="ns_per_value", unit="ns", median=ns[0],
                             p20=ns[1], p80=ns[2]))  # fmt: skip
    return rows


if __name__ == "__main__":
    print_rows(run(quick=False))
