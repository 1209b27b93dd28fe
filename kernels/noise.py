"""Reproducible Gaussian noise keyed by (seed, step, stream).

The whole noise state of a run is the pair (seed, step): the noise added to tensor number
``stream`` at logical step ``step`` is a pure function of the three integers, so a resumed
run, a second rank, or a rerun draws the same values. The torch reference derives a
generator seed from the key; the Triton kernels feed the same key to Philox (``tl.randn``).
The two backends draw different (equally distributed) values.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_key(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit key from (seed, step, stream); distinct inputs give unrelated keys."""
    key = _splitmix64(seed & _MASK64)
    key = _splitmix64(key ^ (step & _MASK64))
    key = _splitmix64(key ^ (stream & _MASK64))
    return key & ((1 << 63) - 1)


def gaussian_noise_torch(
    shape: torch.Size | tuple[int, ...],
    *,
    std: float,
    seed: int,
    step: int,
    stream: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """float32 N(0, std^2) noise of ``shape``, a pure function of (seed, step, stream)."""
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_key(seed, step, stream))
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return noise if std == 1.0 else noise.mul_(std)
