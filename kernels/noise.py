"""Reproducible Gaussian noise keyed by (seed, step, stream).

The whole noise state of a run is the pair (seed, step): the noise added to tensor number
``stream`` at logical step ``step`` is a pure function of the three integers, so a resumed
run, a second rank, or a rerun draws the same values. The torch reference derives a
generator seed from the key; the Triton kernels feed the same key to Philox (``tl.randn``).
The two backends draw different (equally distributed) values.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

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


def _draw(shape: tuple[int, ...], seed: int, step: int, stream: int, device: torch.device):
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_key(seed, step, stream))
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def gaussian_noise_torch(
    shape: torch.Size | tuple[int, ...],
    *,
    std: float,
    seed: int,
    step: int,
    stream: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """float32 N(0, std^2) noise of ``shape``, a pure function of (seed, step, stream).

    Served from the prefetch (see ``prefetch_noise_torch``) when it was drawn ahead; the
    values are the same either way.
    """
    device = torch.device(device)
    key = (seed, step, stream, tuple(shape), device)
    with _LOCK:
        pending = _PREFETCHED.pop(key, None)
    noise = pending.result() if pending is not None else _draw(tuple(shape), *key[:3], device)
    return noise if std == 1.0 else noise.mul_(std)


# ---- CPU prefetch ---------------------------------------------------------------------------
# torch's CPU generator is serial (about 6 ns per value): at a few million parameters the
# noise of a logical step costs as much as a third of a small model's step. The noise of the
# next step is known in advance (a pure function of the key), so it can be drawn by one
# background thread while the forward and backward passes run.
_LOCK = threading.Lock()
_PREFETCHED: dict[tuple, Future] = {}
_EXECUTOR: ThreadPoolExecutor | None = None
_MAX_PREFETCHED = 4096


def prefetch_noise_torch(
    shapes: dict[int, tuple[int, ...]], *, seed: int, step: int, device: torch.device | str
) -> None:
    """Start drawing the std-1 noise of ``step`` for every ``stream: shape`` on a background
    thread (CPU only; elsewhere noise is cheap). Entries of earlier steps of ``seed`` are
    dropped."""
    global _EXECUTOR
    device = torch.device(device)
    if device.type != "cpu":
        return
    with _LOCK:
        stale = [k for k in _PREFETCHED if k[0] == seed and k[1] < step]
        for k in stale:
            _PREFETCHED.pop(k).cancel()
        if len(_PREFETCHED) + len(shapes) > _MAX_PREFETCHED:
            return
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdp-noise")
        for stream, shape in shapes.items():
            key = (seed, step, stream, tuple(shape), device)
            if key not in _PREFETCHED:
                _PREFETCHED[key] = _EXECUTOR.submit(_draw, tuple(shape), seed, step, stream, device)
