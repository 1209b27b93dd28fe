"""Triton multi-tensor noisy SGD / AdamW update (reference: noisy_update.py).

One launch updates every full BLOCK-element chunk of a dtype group, a second the tails. Each
program takes one chunk of one tensor; a (n_chunks, 2) int32 table maps the program to
(tensor, chunk), a (n_tensors, *) int64 table holds each tensor's addresses and a second its
length and noise stream. The tables cost 8 B per chunk plus ~48 B per tensor (one small
host-to-device copy per call), against flattening into one buffer, which reads and writes every
parameter, gradient and state twice more (SGD with momentum, float32: 20 B per element become
40 B).

Bytes per element (float32): SGD reads grad, param (+ momentum) and writes param (+ momentum):
12 B (20 B); AdamW reads grad, param, exp_avg, exp_avg_sq and writes the last three: 28 B.
At that intensity only bandwidth counts, so every access is a 16-byte vector: addresses loaded
from a table carry no alignment, so the host checks that every tensor starts on 16 bytes and
the kernel says so (``tl.multiple_of``); full chunks run without masks (a mask built from a
loaded length would split the vectors), and only the tails, one program per tensor, are masked.

Noise (the spec is kernels/noise.py): Philox4x32-10 keyed by the run secret, counter (block j,
stream, lo32(t), hi32(t)); one Philox call gives the Box-Muller pair (z0, z1) of block j, the
normals of elements 2j and 2j + 1, so the values do not depend on BLOCK and equal the torch
reference's up to the float32 rounding of log, sqrt, sin and cos. The key and step words are
int32 kernel arguments that Triton must not specialise (it would recompile whenever a value
is 1 or a multiple of 16, about one step in 16): ``do_not_specialize``. All arithmetic is
float32; the result is rounded once to the parameter dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdp.kernels import config
from fastdp.kernels.noise import MAX_NOISE_NUMEL, NoiseKey
from fastdp.kernels.triton_utils import check_same_device, tl_dtype

_KEY_ARGS = ("key_lo", "key_hi", "step_lo", "step_hi")


@triton.jit
def _normal_pairs(block, stream, key_lo, key_hi, step_lo, step_hi):
    """Box-Muller pair (z0, z1), float32, of Philox blocks ``block`` (uint32) of ``stream``.

    key_lo/key_hi: the low 64 bits of the run secret as two int32 words; step_lo/step_hi:
    counter words c2, c3 as int32 bit patterns (kernels/noise.py, ``NoiseKey``).
    """
    seed = (key_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | key_lo.to(
        tl.uint32, bitcast=True
    ).to(tl.uint64)
    c1 = stream.to(tl.uint32)
    c2 = step_lo.to(tl.uint32, bitcast=True)
    c3 = step_hi.to(tl.uint32, bitcast=True)
    x0, x1, x2, _ = tl.philox(seed, block, c1, c2, c3)
    u1 = (
        x0.to(tl.float32) * 2.3283064365386963e-10
        + (x1.to(tl.float32) + 0.5) * 5.421010862427522e-20
    )
    u1 = tl.minimum(u1, 1.0)
    theta = (x2.to(tl.float32) * 2.3283064365386963e-10) * 6.2831854820251465
    r = tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _load(ptr, offs, numel, FULL: tl.constexpr):
    if FULL:
        return tl.load(ptr + offs).to(tl.float32)
    return tl.load(ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offs, numel, value, DTYPE: tl.constexpr, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr + offs, _round_to(value, DTYPE))
    else:
        tl.store(ptr + offs, _round_to(value, DTYPE), mask=offs < numel)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to nearest even in DTYPE.

    Done by hand for bfloat16 because Triton's interpreter truncates float32 -> bfloat16
    casts (the GPU rounds to nearest even); the final cast is then exact on both.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def _tensor_ptr(table, k, column, n_columns, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(table + n_columns * k + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _noisy_grad(grad_ptr, offs, numel, chunk, stream, key_lo, key_hi, step_lo, step_hi,
                noise_scale, scale, P_DTYPE: tl.constexpr, ADD_NOISE: tl.constexpr,
                FULL: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The DP gradient scale * grad + noise_scale * xi (noise_scale = std * scale) of a chunk,
    float32, rounded to P_DTYPE as the reference does (then back to float32)."""
    g = _load(grad_ptr, offs, numel, FULL) * scale
    if ADD_NOISE:
        block = (chunk * (BLOCK // 2) + tl.arange(0, BLOCK // 2)).to(tl.uint32)
        z0, z1 = _normal_pairs(block, stream, key_lo, key_hi, step_lo, step_hi)
        g = g + noise_scale * tl.interleave(z0, z1)  # element 2j: z0 of block j, 2j + 1: z1
    return _round_to(g, P_DTYPE).to(tl.float32)


@triton.jit(do_not_specialize=_KEY_ARGS)
def _noisy_sgd_kernel(
    ptr_table,
    meta_table,
    chunk_table,
    lr,
    momentum,
    dampening,
    weight_decay,
    noise_scale,
    scale,
    key_lo,
    key_hi,
    step_lo,
    step_hi,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    ALIGNED: tl.constexpr,
    FULL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """SGD step on chunk ``pid`` of the tensor list.

    ptr_table: (n, 3) int64 addresses of param (P_DTYPE), grad_sum (G_DTYPE) and momentum
    buffer (P_DTYPE), each contiguous (16-byte aligned if ALIGNED); meta_table: (n, 3) int64
    numel, noise stream, 1 if the buffer is new; chunk_table: (n_chunks, 2) int32 (tensor,
    chunk), chunks that are all full if FULL.
    """
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(chunk_table + 2 * pid).to(tl.int64)
    chunk = tl.load(chunk_table + 2 * pid + 1).to(tl.int64)
    numel = tl.load(meta_table + 3 * k)
    stream = tl.load(meta_table + 3 * k + 1)
    param_ptr = _tensor_ptr(ptr_table, k, 0, 3, P_DTYPE, ALIGNED)
    grad_ptr = _tensor_ptr(ptr_table, k, 1, 3, G_DTYPE, ALIGNED)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    g = _noisy_grad(grad_ptr, offs, numel, chunk, stream, key_lo, key_hi, step_lo, step_hi,
                    noise_scale, scale, P_DTYPE, ADD_NOISE, FULL, BLOCK)  # fmt: skip
    if MAXIMIZE:
        g = -g
    param = _load(param_ptr, offs, numel, FULL)
    g = g + weight_decay * param
    if HAS_MOMENTUM:
        first = tl.load(meta_table + 3 * k + 2)
        buf_ptr = _tensor_ptr(ptr_table, k, 2, 3, P_DTYPE, ALIGNED)
        buf = _load(buf_ptr, offs, numel, FULL)
        buf = tl.where(first != 0, g, buf * momentum + (1.0 - dampening) * g)
        _store(buf_ptr, offs, numel, buf, P_DTYPE, FULL)
        if NESTEROV:
            g = g + momentum * _round_to(buf, P_DTYPE).to(tl.float32)
        else:
            g = _round_to(buf, P_DTYPE).to(tl.float32)
    _store(param_ptr, offs, numel, param - lr * g, P_DTYPE, FULL)


@triton.jit(do_not_specialize=_KEY_ARGS)
def _noisy_adamw_kernel(
    ptr_table,
    meta_table,
    chunk_table,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_size,
    sqrt_bias_correction2,
    noise_scale,
    scale,
    key_lo,
    key_hi,
    step_lo,
    step_hi,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    ALIGNED: tl.constexpr,
    FULL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """AdamW step on chunk ``pid`` of the tensor list (torch.optim.AdamW, amsgrad off).

    ptr_table: (n, 4) int64 addresses of param, grad_sum (G_DTYPE), exp_avg and exp_avg_sq
    (P_DTYPE), each contiguous (16-byte aligned if ALIGNED); meta_table: (n, 3) int64 numel,
    noise stream, unused; chunk_table: (n_chunks, 2) int32 (tensor, chunk), all full if FULL.
    step_size = lr / (1 - beta1^t).
    """
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(chunk_table + 2 * pid).to(tl.int64)
    chunk = tl.load(chunk_table + 2 * pid + 1).to(tl.int64)
    numel = tl.load(meta_table + 3 * k)
    stream = tl.load(meta_table + 3 * k + 1)
    param_ptr = _tensor_ptr(ptr_table, k, 0, 4, P_DTYPE, ALIGNED)
    grad_ptr = _tensor_ptr(ptr_table, k, 1, 4, G_DTYPE, ALIGNED)
    exp_avg_ptr = _tensor_ptr(ptr_table, k, 2, 4, P_DTYPE, ALIGNED)
    exp_avg_sq_ptr = _tensor_ptr(ptr_table, k, 3, 4, P_DTYPE, ALIGNED)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    g = _noisy_grad(grad_ptr, offs, numel, chunk, stream, key_lo, key_hi, step_lo, step_hi,
                    noise_scale, scale, P_DTYPE, ADD_NOISE, FULL, BLOCK)  # fmt: skip
    if MAXIMIZE:
        g = -g
    param = _load(param_ptr, offs, numel, FULL)
    exp_avg = _load(exp_avg_ptr, offs, numel, FULL)
    exp_avg_sq = _load(exp_avg_sq_ptr, offs, numel, FULL)
    param = param * (1.0 - lr * weight_decay)
    exp_avg = exp_avg + (1.0 - beta1) * (g - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * g * g
    _store(exp_avg_ptr, offs, numel, exp_avg, P_DTYPE, FULL)
    _store(exp_avg_sq_ptr, offs, numel, exp_avg_sq, P_DTYPE, FULL)
    exp_avg = _round_to(exp_avg, P_DTYPE).to(tl.float32)  # the reference keeps them in P_DTYPE
    exp_avg_sq = _round_to(exp_avg_sq, P_DTYPE).to(tl.float32)
    denom = tl.sqrt(exp_avg_sq) / sqrt_bias_correction2 + eps
    _store(param_ptr, offs, numel, param - step_size * (exp_avg / denom), P_DTYPE, FULL)


def _as_int32(word: int) -> int:
    """A 32-bit word as the signed int32 with the same bits (Triton types it i32, always)."""
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= (1 << 31) else word


def _key_args(noise: NoiseKey | None) -> dict[str, int]:
    if noise is None:
        return dict.fromkeys(_KEY_ARGS, 0)
    key = noise.philox_key() & 0xFFFFFFFFFFFFFFFF
    _, step_lo, step_hi = noise.counter_words(0)
    words = (key & 0xFFFFFFFF, key >> 32, step_lo, step_hi)
    return {name: _as_int32(w) for name, w in zip(_KEY_ARGS, words)}


def _chunk_tables(numels: list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2) int32 (tensor index, chunk index) of the full BLOCK-element chunks, and of the
    partial last chunk of each tensor whose numel is not a multiple of BLOCK."""
    full = torch.tensor([n // block for n in numels], dtype=torch.int64)
    index = torch.repeat_interleave(torch.arange(len(numels)), full)
    chunk = torch.arange(index.numel()) - (torch.cumsum(full, 0) - full)[index]
    tails = [(k, n // block) for k, n in enumerate(numels) if n % block]
    tail = torch.tensor(tails, dtype=torch.int64).reshape(-1, 2)
    return torch.stack([index, chunk], 1).to(torch.int32), tail.to(torch.int32)


def _groups(params: list[torch.Tensor], grads: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Tensor indices grouped by (param dtype, grad dtype): one launch per group."""
    groups: dict[tuple, list[int]] = {}
    for k, (p, g) in enumerate(zip(params, grads)):
        if p.numel() > 0:
            groups.setdefault((p.dtype, g.dtype), []).append(k)
    return groups


def _check(params, grads, *states) -> torch.device:
    device = check_same_device(*params, *grads, *(s for s in states if s is not None))
    for k, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape:
            raise ValueError(f"param {k} has shape {tuple(p.shape)} but its grad {tuple(g.shape)}")
        for s in states[k :: len(params)] if states else ():
            if s is not None and (
                s.shape != p.shape or s.dtype != p.dtype or not s.is_contiguous()
            ):
                raise ValueError(f"optimizer state of param {k} must match its shape and dtype")
        if p.numel() > MAX_NOISE_NUMEL:
            raise ValueError(f"param {k} has more elements than a noise stream covers")
        if not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError("the fused update needs contiguous params and gradient sums")
    return device


def _launch(kernel, tensors_per_param, streams, firsts, device, **kwargs) -> None:
    spec = config.device_spec(device)
    cfg = config.update_config(spec)
    flat = [t for ts in tensors_per_param for t in ts]
    aligned = spec is not None and all(t.data_ptr() % 16 == 0 for t in flat)
    numels = [ts[0].numel() for ts in tensors_per_param]
    ptrs = torch.tensor([[t.data_ptr() for t in ts] for ts in tensors_per_param], dtype=torch.int64)
    meta = torch.tensor(list(zip(numels, streams, firsts)), dtype=torch.int64)
    full, tail = _chunk_tables(numels, cfg.block)
    ptrs, meta, chunks = (
        t.to(device, non_blocking=True) for t in (ptrs, meta, torch.cat([full, tail]))
    )
    for is_full, start, count in ((True, 0, full.shape[0]), (False, full.shape[0], tail.shape[0])):
        if count:
            kernel[(count,)](
                ptrs, meta, chunks[start:], ALIGNED=aligned, FULL=is_full, BLOCK=cfg.block,
                num_warps=cfg.num_warps, **kwargs,
            )  # fmt: skip


def _streams(streams: list[int] | None, index: list[int]) -> list[int]:
    return [streams[k] if streams is not None else k for k in index]


@torch.no_grad()
def noisy_sgd_update(
    params: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    noise: NoiseKey | None = None,
    scale: float = 1.0,
    streams: list[int] | None = None,
) -> list[torch.Tensor | None]:
    """Triton version of ``noisy_sgd_update_torch``: same arguments, same returned buffers."""
    if not (len(params) == len(grad_sums) == len(momentum_buffers)):
        raise ValueError("params, grad_sums and momentum_buffers differ in length")
    device = _check(params, grad_sums, *momentum_buffers)
    buffers = list(momentum_buffers)
    first = [0] * len(params)
    if momentum != 0:
        for k, p in enumerate(params):
            if buffers[k] is None:
                buffers[k] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                first[k] = 1
    add_noise = noise is not None and noise.adds_noise
    for (p_dtype, g_dtype), index in _groups(params, grad_sums).items():
        tensors = [
            (params[k], grad_sums[k], buffers[k] if momentum != 0 else params[k]) for k in index
        ]
        _launch(
            _noisy_sgd_kernel, tensors, _streams(streams, index), [first[k] for k in index],
            device, lr=float(lr), momentum=float(momentum), dampening=float(dampening),
            weight_decay=float(weight_decay), noise_scale=noise.std * scale if add_noise else 0.0,
            scale=float(scale), **_key_args(noise), P_DTYPE=tl_dtype(p_dtype),
            G_DTYPE=tl_dtype(g_dtype), HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize), ADD_NOISE=add_noise,
        )  # fmt: skip
    return buffers


@torch.no_grad()
def noisy_adamw_update(
    params: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    step_count: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    maximize: bool = False,
    noise: NoiseKey | None = None,
    scale: float = 1.0,
    streams: list[int] | None = None,
) -> None:
    """Triton version of ``noisy_adamw_update_torch`` (``step_count`` is t after this step)."""
    if not (len(params) == len(grad_sums) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError("params, grad_sums, exp_avgs and exp_avg_sqs differ in length")
    device = _check(params, grad_sums, *exp_avgs, *exp_avg_sqs)
    bias_correction1 = 1 - beta1**step_count
    bias_correction2 = 1 - beta2**step_count
    add_noise = noise is not None and noise.adds_noise
    for (p_dtype, g_dtype), index in _groups(params, grad_sums).items():
        tensors = [(params[k], grad_sums[k], exp_avgs[k], exp_avg_sqs[k]) for k in index]
        _launch(
            _noisy_adamw_kernel, tensors, _streams(streams, index), [0] * len(index), device,
            lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
            weight_decay=float(weight_decay), step_size=lr / bias_correction1,
            sqrt_bias_correction2=math.sqrt(bias_correction2),
            noise_scale=noise.std * scale if add_noise else 0.0, scale=float(scale),
            **_key_args(noise),
            P_DTYPE=tl_dtype(p_dtype), G_DTYPE=tl_dtype(g_dtype), MAXIMIZE=bool(maximize),
            ADD_NOISE=add_noise,
        )  # fmt: skip
