"""Counter-based randomness: Philox4x32-10 keyed by a 128-bit run secret.

Every random draw of a run (the Gaussian noise of each tensor at each logical step, the
Poisson sample set, the shuffle permutation) is Philox4x32-10 (Salmon et al. 2011, exactly as
Random123 and Triton's ``tl.philox``) applied to a counter that names the draw:

    key     (k0, k1) = (S mod 2**32, (S >> 32) mod 2**32)            64 bits of the secret S
    counter (c0, c1, c2, c3) = (block j, stream, lo32(t), hi32(t)),  t = step XOR (S >> 64)

so a (step, stream, block) triple never repeats within a run (no noise reused: the difference
of two released updates always carries fresh noise), and the 128-bit secret S (from OS
entropy for ``seed=None``) cannot be brute-forced. Streams: the parameter index k for noise,
``SAMPLING_STREAM`` / ``SHUFFLE_STREAM`` for the data order; ``step`` is the logical step (the
epoch for the shuffle).

Normals (float32, Box-Muller on one block j -> two values):
    u1 = min(1, f32(x0) 2**-32 + (f32(x1) + 0.5) 2**-64),  u2 = f32(x2) 2**-32,
    r = sqrt(-2 ln u1),  z0 = r cos(f32(2 pi) u2),  z1 = r sin(f32(2 pi) u2)   (x3 unused);
element e of a tensor (row-major) is z_(e % 2) of block e // 2. u1 >= 2**-65, so |z| reaches
9.49: no truncation of the tails (``tl.randn`` clamps u1 at 1e-7, i.e. |z| <= 5.68, which
would cost delta). Uniform float64 (sampling): block j gives lane 0 = ((x0 >> 5) 2**26 +
(x1 >> 6)) 2**-53 and lane 1 the same from (x2, x3); element e is lane e % 2 of block e // 2.

The Triton kernels compute the same function (``NoiseKey.philox_key`` / ``counter_words`` are
their arguments), so CPU and GPU draw the same noise up to float32 rounding of log/sin/cos.
This module is the CPU implementation: Philox compiled (philox_cpu.py) or in numpy on uint64
lanes, log/sin/cos in numpy, in cache-sized chunks over two threads, plus a background
prefetch of the next step's noise.
"""

from __future__ import annotations

import hashlib
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fastdp.kernels import philox_cpu

SAMPLING_STREAM = 0x80000000  # Poisson sampling; noise streams (parameter indices) are below
SHUFFLE_STREAM = 0x80000001  # per-epoch permutation of fixed batches
MAX_NOISE_NUMEL = 1 << 33  # block index c0 < 2**32, two values per block

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_TWO_PI = np.float32(2 * math.pi)
_CHUNK_BLOCKS = 1 << 14  # 16K blocks: the ~10 live uint64 lanes stay in L2


def derive_secret(seed: int) -> int:
    """The 128-bit run secret of an explicit seed (BLAKE2b, so nearby seeds are unrelated).

    An explicit seed is for reproducible experiments: anyone who knows it can recompute the
    noise. ``seed=None`` draws the secret from OS entropy instead.
    """
    digest = hashlib.blake2b(b"fastdp-seed:" + str(int(seed)).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class NoiseKey:
    """The noise of one logical step: run secret S (128-bit int), step, and std (0: none).

    One object travels unchanged through the torch reference, the dispatcher and the Triton
    launcher; each tensor's stream (its parameter index) is passed beside it.
    """

    secret: int
    step: int
    std: float

    def __post_init__(self) -> None:
        if not 0 <= self.secret < (1 << 128):
            raise ValueError(f"the run secret must be a 128-bit int >= 0, got {self.secret}")
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")
        if not (math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"std must be a finite number >= 0, got {self.std}")

    @property
    def adds_noise(self) -> bool:
        return self.std > 0

    def philox_key(self) -> int:
        """S mod 2**64 as a signed int64 (Triton's ``tl.philox`` seed: k0 = its low 32 bits)."""
        k = self.secret & _MASK64
        return k - (1 << 64) if k >= (1 << 63) else k

    def counter_words(self, stream: int) -> tuple[int, int, int]:
        """(c1, c2, c3) of ``stream`` at this step, each in [0, 2**32); c0 is the block."""
        return counter_words(self.secret, self.step, stream)


def counter_words(secret: int, step: int, stream: int) -> tuple[int, int, int]:
    """(c1, c2, c3) = (stream, lo32(t), hi32(t)) with t = (step XOR (S >> 64)) mod 2**64."""
    if not 0 <= stream <= _MASK32:
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")
    t = (int(step) ^ (secret >> 64)) & _MASK64
    return int(stream), t & _MASK32, t >> 32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> tuple:
    """Philox4x32-10 of counters (c0, c1, c2, c3) under key (k0, k1).

    Each counter word is a Python int or a numpy uint64 array of values < 2**32 (they
    broadcast); the four outputs have the same kinds. Scalar words stay scalar through the
    rounds, so a tensor's draw, where only c0 varies, skips about one round of array work.
    """
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0 = c0 * _M0
        p1 = c2 * _M1
        c0, c1, c2, c3 = (p1 >> 32) ^ (c1 ^ k0), p1 & _MASK32, (p0 >> 32) ^ (c3 ^ k1), p0 & _MASK32
    return c0, c1, c2, c3


def _blocks(secret: int, step: int, stream: int, start: int, stop: int) -> tuple:
    """Philox outputs (x0, x1, x2, x3) of blocks [start, stop) of (step, stream)."""
    c1, c2, c3 = counter_words(secret, step, stream)
    c0 = np.arange(start, stop, dtype=np.uint64)
    return philox4x32_10(c0, c1, c2, c3, secret & _MASK32, (secret >> 32) & _MASK32)


def uniforms_from_words(
    x0: np.ndarray, x1: np.ndarray, x2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """float32 u1 = min(1, f32(x0) 2**-32 + (f32(x1) + 0.5) 2**-64) in [2**-65, 1] and
    u2 = f32(x2) 2**-32 in [0, 1] from Philox words (uint64 arrays of values < 2**32)."""
    u1 = x1.astype(np.float32)
    u1 += np.float32(0.5)
    u1 *= np.float32(2.0**-64)
    u1 += x0.astype(np.float32) * np.float32(2.0**-32)
    np.minimum(u1, np.float32(1.0), out=u1)
    u2 = x2.astype(np.float32)
    u2 *= np.float32(2.0**-32)
    return u1, u2


def box_muller_inputs_numpy(
    secret: int, step: int, stream: int, start: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (u1, u2) of blocks [start, start + n) of (step, stream), in numpy."""
    x0, x1, x2, _ = _blocks(secret, step, stream, start, start + n)
    return uniforms_from_words(x0, x1, x2)


def box_muller_inputs(
    secret: int, step: int, stream: int, start: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (u1, u2) of blocks [start, start + n): compiled (philox_cpu.py) where a C
    compiler is available, else numpy; the two are bit-identical."""
    compiled = philox_cpu.load()
    if compiled is None:
        return box_muller_inputs_numpy(secret, step, stream, start, n)
    c1, c2, c3 = counter_words(secret, step, stream)
    u1, u2 = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    k0, k1 = secret & _MASK32, (secret >> 32) & _MASK32
    compiled(start, n, c1, c2, c3, k0, k1, u1.ctypes.data, u2.ctypes.data)
    return u1, u2


def box_muller(u1: np.ndarray, u2: np.ndarray, out: np.ndarray) -> None:
    """out[:, 0] = r cos(f32(2 pi) u2), out[:, 1] = r sin(...), r = sqrt(-2 ln u1), all in
    float32; u1 and u2 are overwritten."""
    r = np.log(u1, out=u1)
    r *= np.float32(-2.0)
    np.sqrt(r, out=r)
    theta = np.multiply(u2, _TWO_PI, out=u2)
    np.multiply(r, np.cos(theta), out=out[:, 0])
    np.multiply(r, np.sin(theta, out=theta), out=out[:, 1])


def _normal_blocks(out: np.ndarray, secret: int, step: int, stream: int, start: int) -> None:
    """Write z0, z1 of blocks [start, start + len(out)) into out, a (n, 2) float32 array."""
    box_muller(*box_muller_inputs(secret, step, stream, start, len(out)), out)


def _check_numel(numel: int) -> None:
    if numel > MAX_NOISE_NUMEL:
        raise ValueError(
            f"a tensor of {numel} elements is over the {MAX_NOISE_NUMEL} a noise stream "
            "covers (2**32 Philox blocks of two values); split the parameter."
        )


def _draw(shape: tuple[int, ...], secret: int, step: int, stream: int) -> torch.Tensor:
    numel = math.prod(shape)
    _check_numel(numel)
    n_blocks = (numel + 1) // 2
    pairs = np.empty((n_blocks, 2), dtype=np.float32)
    bounds = list(range(0, n_blocks, _CHUNK_BLOCKS)) + [n_blocks]

    def work(lo: int, hi: int) -> None:
        for a in range(lo, hi):
            _normal_blocks(pairs[bounds[a] : bounds[a + 1]], secret, step, stream, bounds[a])

    n_chunks = len(bounds) - 1
    if n_chunks >= 4:  # two threads, each on a contiguous half (numpy drops the GIL in loops)
        half = n_chunks // 2
        other = _pool().submit(work, half, n_chunks)
        work(0, half)
        other.result()
    else:
        work(0, n_chunks)
    return torch.from_numpy(pairs.reshape(-1)[:numel]).reshape(shape)


def philox_normal(shape: torch.Size | tuple[int, ...], key: NoiseKey, stream: int) -> torch.Tensor:
    """float32 standard normals (std 1, not ``key.std``) of ``shape`` on the CPU: stream
    ``stream`` at ``key.step``. Served from the prefetch when it was drawn ahead; the values
    are the same either way."""
    if not 0 <= stream < SAMPLING_STREAM:
        raise ValueError(f"noise streams are in [0, 2**31), got {stream}")
    shape = tuple(int(s) for s in shape)
    entry = (key.secret, key.step, stream, shape)
    with _LOCK:
        pending = _PREFETCHED.pop(entry, None)
    return pending.result() if pending is not None else _draw(shape, *entry[:3])


def philox_uniform64(
    n: int, secret: int, step: int, stream: int, *, offset: int = 0
) -> torch.Tensor:
    """float64 uniforms on [0, 1) (53 random bits): elements [offset, offset + n) of
    (step, stream), element e being lane e % 2 of block e // 2."""
    first, last = offset // 2, (offset + n + 1) // 2
    if last > (1 << 32):
        raise ValueError("a uniform stream holds at most 2**33 values")
    x0, x1, x2, x3 = _blocks(int(secret), int(step), stream, first, last)
    lanes = np.empty((last - first, 2), dtype=np.float64)
    lanes[:, 0] = ((x0 >> 5) << 26) | (x1 >> 6)
    lanes[:, 1] = ((x2 >> 5) << 26) | (x3 >> 6)
    lanes *= 2.0**-53
    start = offset - 2 * first
    return torch.from_numpy(lanes.reshape(-1)[start : start + n])


# ---- threads and CPU prefetch -----------------------------------------------------------------
# The noise of the next logical step is known in advance (a pure function of its key), so one
# background thread draws it while the forward and backward passes run; a large tensor's draw is
# split over two threads (the machine's cores), either way.
_LOCK = threading.Lock()
_PREFETCHED: dict[tuple, Future] = {}
_PREFETCHER: ThreadPoolExecutor | None = None
_POOL: ThreadPoolExecutor | None = None
_MAX_PREFETCHED = 4096


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdp-philox")
        return _POOL


def prefetch_noise(shapes: dict[int, tuple[int, ...]], key: NoiseKey) -> None:
    """Start drawing the std-1 CPU noise of ``key.step`` for every ``stream: shape`` in the
    background. Entries of earlier steps of the same secret are dropped."""
    global _PREFETCHER
    with _LOCK:
        stale = [e for e in _PREFETCHED if e[0] == key.secret and e[1] < key.step]
        for e in stale:
            _PREFETCHED.pop(e).cancel()
        if len(_PREFETCHED) + len(shapes) > _MAX_PREFETCHED:
            return
        if _PREFETCHER is None:
            _PREFETCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdp-noise")
        for stream, shape in shapes.items():
            entry = (key.secret, key.step, stream, tuple(int(s) for s in shape))
            if entry not in _PREFETCHED:
                _PREFETCHED[entry] = _PREFETCHER.submit(_draw, entry[3], *entry[:3])
