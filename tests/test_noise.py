"""Philox4x32-10 noise and sampling randomness: known answers, Triton parity, statistics, keys."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from fastdp.engine import _shared_secret
from fastdp.kernels import noise, philox_cpu
from fastdp.kernels.noise import (
    SAMPLING_STREAM,
    NoiseKey,
    derive_secret,
    philox4x32_10,
    philox_normal,
    philox_uniform64,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

SECRET = derive_secret(2024)


def _u64(*values):
    return [np.array([v], dtype=np.uint64) for v in values]


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123 kat_vectors, philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w[0]) for w in philox4x32_10(*_u64(*counter), *key)) == expected
    # scalar words (as a tensor's c1..c3 are) give the same answer
    assert tuple(int(w[0]) for w in philox4x32_10(*_u64(counter[0]), *counter[1:], *key)) == (
        expected
    )


def _philox_words(seed, c0_ptr, out_ptr, c1, c2, c3, N: tl.constexpr):
    """tl.philox of counters (c0[i], c1, c2, c3); c* are int32 carrying uint32 bits."""
    offs = tl.arange(0, N)
    w0 = tl.load(c0_ptr + offs).to(tl.uint32, bitcast=True)
    w1 = tl.full([N], c1, tl.int32).to(tl.uint32, bitcast=True)
    w2 = tl.full([N], c2, tl.int32).to(tl.uint32, bitcast=True)
    w3 = tl.full([N], c3, tl.int32).to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = tl.philox(seed, w0, w1, w2, w3)
    tl.store(out_ptr + offs, x0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + N + offs, x1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 2 * N + offs, x2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 3 * N + offs, x3.to(tl.int32, bitcast=True))


def _triton_words(c0: np.ndarray, c1: int, c2: int, c3: int, seed: int) -> list[np.ndarray]:
    kernel = triton.jit(_philox_words)  # decorated here, with TRITON_INTERPRET set
    n = len(c0)
    out = torch.empty(4 * n, dtype=torch.int32)
    words = torch.from_numpy(c0.astype(np.int64)).to(torch.int32)  # c0's bits (wrapping)
    as_i32 = [w - (1 << 32) if w >= 1 << 31 else w for w in (c1, c2, c3)]
    kernel[(1,)](seed, words, out, *as_i32, N=n)
    return [w.numpy().astype(np.int64) & 0xFFFFFFFF for w in out.reshape(4, n)]


@pytest.mark.parametrize("secret", [SECRET, 5, (1 << 63) + 12345])
def test_matches_triton_philox(monkeypatch, secret):
    """tl.philox(key.philox_key(), j, *key.counter_words(stream)) is the CPU generator."""
    if triton is None:
        pytest.skip("needs triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    key = NoiseKey(secret, 77, 1.0)
    stream = 3
    c0 = np.array([0, 1, 2, 3, 1000, 2**31 - 1, 2**31 + 5, 2**32 - 1], dtype=np.uint64)
    words = key.counter_words(stream)
    got = _triton_words(c0, *words, key.philox_key())
    want = philox4x32_10(c0, *words, secret & 0xFFFFFFFF, (secret >> 32) & 0xFFFFFFFF)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.astype(np.int64))


def test_compiled_and_numpy_inputs_are_bit_identical():
    if philox_cpu.load() is None:
        pytest.skip("no C compiler: the numpy path is the only one")
    for start, n in [(0, 5000), (2**32 - 300, 300)]:
        fast = noise.box_muller_inputs(SECRET, 12, 4, start, n)
        slow = noise.box_muller_inputs_numpy(SECRET, 12, 4, start, n)
        for a, b in zip(fast, slow):
            np.testing.assert_array_equal(a, b)


def test_no_repeated_block_across_a_million_step_tensor_keys():
    """Block 0 of 1000 steps x 1000 tensors: 10**6 distinct 128-bit outputs (the 32-bit
    mt19937 seeds of the old generator repeated ~3 times in 10**6 draws)."""
    steps, streams = np.meshgrid(np.arange(1000), np.arange(1000), indexing="ij")
    t = (steps.ravel().astype(np.uint64)) ^ np.uint64(SECRET >> 64)
    c2, c3 = t & np.uint64(0xFFFFFFFF), t >> np.uint64(32)
    c1 = streams.ravel().astype(np.uint64)
    c0 = np.zeros_like(c1)
    x = philox4x32_10(c0, c1, c2, c3, SECRET & 0xFFFFFFFF, (SECRET >> 32) & 0xFFFFFFFF)
    packed = np.stack([(x[0] << np.uint64(32)) | x[1], (x[2] << np.uint64(32)) | x[3]], axis=1)
    assert len(np.unique(packed, axis=0)) == 10**6


def test_noise_statistics():
    """N = 2**20 values, fixed secret; each bound is 5 standard errors, the KS distance is
    under its 0.1% critical value 1.95 / sqrt(N)."""
    from scipy import stats

    key = NoiseKey(SECRET, 3, 1.0)
    z = philox_normal((1024, 1024), key, 0).double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(z.numpy(), "norm").statistic < 1.95 / math.sqrt(n)
    z0, z1 = z[0::2], z[1::2]  # the two values of one block
    others = [(z0, z1), (z[:-1], z[1:]), (z, philox_normal((n,), key, 1).double())]
    others.append((z, philox_normal((n,), NoiseKey(SECRET, 4, 1.0), 0).double()))
    for u, v in others:
        corr = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(len(u)), corr


def test_tails_are_not_truncated():
    """u1 >= 2**-65 (|z| up to 9.49), where tl.randn's 1e-7 clamp stops at 5.68 sigma."""
    zero = np.zeros(1, dtype=np.uint64)
    u1, u2 = noise.uniforms_from_words(zero, zero, zero)
    assert u1[0] == np.float32(2.0**-65)
    out = np.empty((1, 2), dtype=np.float32)
    noise.box_muller(u1, u2, out)
    assert out[0, 0] == pytest.approx(math.sqrt(130 * math.log(2)), rel=1e-6)
    small = np.array([100], dtype=np.uint64)  # x0 = 100: |z| > 5.9, one block in 4e7
    u1, _ = noise.uniforms_from_words(small, zero, zero)
    assert math.sqrt(-2 * math.log(u1[0])) > 5.7
    top = np.full(1, 2**32 - 1, dtype=np.uint64)
    assert noise.uniforms_from_words(top, top, top)[0][0] == 1.0  # clamped: r = 0


def test_elements_follow_blocks_and_shapes():
    key = NoiseKey(SECRET, 9, 2.5)
    flat = philox_normal((32,), key, 7)
    assert torch.equal(philox_normal((5, 3), key, 7).flatten(), flat[:15])
    u1, u2 = noise.box_muller_inputs_numpy(SECRET, 9, 7, 0, 16)
    pairs = np.empty((16, 2), dtype=np.float32)
    noise.box_muller(u1, u2, pairs)
    assert torch.equal(flat, torch.from_numpy(pairs.reshape(-1)))
    assert philox_normal((0, 4), key, 7).shape == (0, 4)


def test_chunked_two_thread_draw_equals_one_chunk(monkeypatch):
    key = NoiseKey(SECRET, 1, 1.0)
    whole = philox_normal((10_001,), key, 2)
    monkeypatch.setattr(noise, "_CHUNK_BLOCKS", 1000)
    assert torch.equal(philox_normal((10_001,), key, 2), whole)


def test_prefetch_serves_the_same_values():
    key = NoiseKey(SECRET, 40, 1.0)
    direct = philox_normal((300, 7), key, 3)
    noise.prefetch_noise({3: (300, 7), 5: (11,)}, key)
    assert torch.equal(philox_normal((300, 7), key, 3), direct)
    noise.prefetch_noise({5: (11,)}, NoiseKey(SECRET, 41, 1.0))  # drops step-40 leftovers
    assert not any(e[0] == SECRET and e[1] == 40 for e in noise._PREFETCHED)


def test_refusals():
    key = NoiseKey(SECRET, 0, 1.0)
    with pytest.raises(ValueError, match="split the parameter"):
        philox_normal((2**33 + 1,), key, 0)
    with pytest.raises(ValueError, match="noise streams"):
        philox_normal((4,), key, SAMPLING_STREAM)
    with pytest.raises(ValueError):
        NoiseKey(1 << 128, 0, 1.0)
    with pytest.raises(ValueError):
        NoiseKey(SECRET, -1, 1.0)
    with pytest.raises(ValueError):
        NoiseKey(SECRET, 0, float("nan"))


def test_key_words():
    secret = (0xAABBCCDD << 96) | (0x11223344 << 64) | (0xF0000000_00000001)
    key = NoiseKey(secret, 5, 1.0)
    assert key.philox_key() == 0xF0000000_00000001 - (1 << 64)
    t = 5 ^ ((0xAABBCCDD << 32) | 0x11223344)
    assert key.counter_words(9) == (9, t & 0xFFFFFFFF, t >> 32)
    assert all(0 <= w < 2**32 for w in key.counter_words(SAMPLING_STREAM))


def test_uniform64():
    u = philox_uniform64(200_001, SECRET, 3, SAMPLING_STREAM)
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / len(u))
    assert torch.equal(philox_uniform64(10, SECRET, 3, SAMPLING_STREAM, offset=3), u[3:13])
    # 53 bits: the low bits vary too
    assert len(torch.unique((u * 2.0**53) % 2)) == 2


def test_secrets_from_seeds():
    a, b = _shared_secret(None, 1), _shared_secret(None, 1)
    assert a != b and 0 <= a < 2**128 and 0 <= b < 2**128
    assert _shared_secret(7, 1) == _shared_secret(7, 1) == derive_secret(7)
    assert derive_secret(7) != derive_secret(8)
    digest = hashlib.blake2b(b"fastdp-seed:7", digest_size=16).digest()
    assert derive_secret(7) == int.from_bytes(digest, "little")
