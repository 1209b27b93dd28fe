"""Triton multi-tensor noisy SGD / AdamW update (reference: noisy_update.py).

One launch updates every tensor of a dtype group. Each program takes one chunk of BLOCK
elements of one tensor; a (n_chunks, 2) int32 table maps the program to (tensor, chunk), and a
(n_tensors, *) int64 table holds each tensor's pointers, length and noise key. The tables cost
8 B per chunk plus ~48 B per tensor (one small host-to-device copy per call), against the
alternative of flattening into one buffer, which reads and writes every parameter, gradient
and state twice more (SGD with momentum, float32: 20 B moved per element become 40 B).

Bytes per element (float32): SGD reads grad, param (+ momentum) and writes param (+ momentum):
12 B (20 B); AdamW reads grad, param, exp_avg, exp_avg_sq and writes the last three: 28 B.

Noise: Philox keyed by mix_key(seed, step, stream) per tensor; element e uses output e % 4 of
``tl.randn4x(key, e // 4)``, so one Philox call feeds 4 elements and the values do not depend
on BLOCK. Counters are int32 (numel < 2**33 is checked), so Philox runs on 32-bit counters
alike in every Triton >= 3.1. All arithmetic is float32; the result is rounded once to the
parameter dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdp.kernels import config
from fastdp.kernels.noise import mix_key
from fastdp.kernels.triton_utils import check_same_device, tl_dtype, to_int64


@triton.jit
def _noisy_grad(grad_ptr, key, counter, offs, mask, noise_std, scale, ADD_NOISE: tl.constexpr):
    """float32 (grad + noise_std * xi) * scale over a (BLOCK // 4, 4) block of offsets.

    counter: (BLOCK // 4,) int32, offs // 4 for each row of 4 consecutive elements.
    """
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD_NOISE:
        lane = offs % 4
        n0, n1, n2, n3 = tl.randn4x(key, counter)
        xi = tl.where(
            lane == 0,
            n0[:, None],
            tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])),
        )
        g = g + noise_std * xi
    return g * scale


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
def _noisy_sgd_kernel(
    ptr_table,
    meta_table,
    chunk_table,
    lr,
    momentum,
    dampening,
    weight_decay,
    noise_std,
    scale,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """SGD step on chunk ``pid`` of the tensor list.

    ptr_table: (n, 3) int64 addresses of param (P_DTYPE), grad_sum (G_DTYPE) and momentum buffer
    (P_DTYPE), each contiguous; meta_table: (n, 3) int64 numel, noise key, 1 if the buffer is new;
    chunk_table: (n_chunks, 2) int32 (tensor, chunk).
    """
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(chunk_table + 2 * pid).to(tl.int64)
    chunk = tl.load(chunk_table + 2 * pid + 1).to(tl.int64)
    numel = tl.load(meta_table + 3 * k)
    key = tl.load(meta_table + 3 * k + 1)
    param_ptr = tl.load(ptr_table + 3 * k).to(tl.pointer_type(P_DTYPE))
    grad_ptr = tl.load(ptr_table + 3 * k + 1).to(tl.pointer_type(G_DTYPE))
    rows = tl.arange(0, BLOCK // 4)
    offs = chunk * BLOCK + rows[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = offs < numel
    counter = (chunk * (BLOCK // 4) + rows).to(tl.int32)  # numel < 2**33: checked on the host
    g = _noisy_grad(grad_ptr, key, counter, offs, mask, noise_std, scale, ADD_NOISE)
    g = _round_to(g, P_DTYPE).to(tl.float32)  # the reference rounds the DP gradient to p's dtype
    if MAXIMIZE:
        g = -g
    param = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = g + weight_decay * param
    if HAS_MOMENTUM:
        first = tl.load(meta_table + 3 * k + 2)
        buf_ptr = tl.load(ptr_table + 3 * k + 2).to(tl.pointer_type(P_DTYPE))
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        buf = tl.where(first != 0, g, buf * momentum + (1.0 - dampening) * g)
        tl.store(buf_ptr + offs, _round_to(buf, P_DTYPE), mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    tl.store(param_ptr + offs, _round_to(param - lr * g, P_DTYPE), mask=mask)


@triton.jit
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
    noise_std,
    scale,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """AdamW step on chunk ``pid`` of the tensor list (torch.optim.AdamW, amsgrad off).

    ptr_table: (n, 4) int64 addresses of param, grad_sum (G_DTYPE), exp_avg and exp_avg_sq
    (P_DTYPE), each contiguous; meta_table: (n, 3) int64 numel, noise key, unused;
    chunk_table: (n_chunks, 2) int32 (tensor, chunk). step_size = lr / (1 - beta1^t).
    """
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(chunk_table + 2 * pid).to(tl.int64)
    chunk = tl.load(chunk_table + 2 * pid + 1).to(tl.int64)
    numel = tl.load(meta_table + 3 * k)
    key = tl.load(meta_table + 3 * k + 1)
    param_ptr = tl.load(ptr_table + 4 * k).to(tl.pointer_type(P_DTYPE))
    grad_ptr = tl.load(ptr_table + 4 * k + 1).to(tl.pointer_type(G_DTYPE))
    exp_avg_ptr = tl.load(ptr_table + 4 * k + 2).to(tl.pointer_type(P_DTYPE))
    exp_avg_sq_ptr = tl.load(ptr_table + 4 * k + 3).to(tl.pointer_type(P_DTYPE))
    rows = tl.arange(0, BLOCK // 4)
    offs = chunk * BLOCK + rows[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = offs < numel
    counter = (chunk * (BLOCK // 4) + rows).to(tl.int32)  # numel < 2**33: checked on the host
    g = _noisy_grad(grad_ptr, key, counter, offs, mask, noise_std, scale, ADD_NOISE)
    g = _round_to(g, P_DTYPE).to(tl.float32)
    if MAXIMIZE:
        g = -g
    param = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    param = param * (1.0 - lr * weight_decay)
    exp_avg = exp_avg + (1.0 - beta1) * (g - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt(exp_avg_sq) / sqrt_bias_correction2 + eps
    param = param - step_size * (exp_avg / denom)
    tl.store(exp_avg_ptr + offs, _round_to(exp_avg, P_DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, _round_to(exp_avg_sq, P_DTYPE), mask=mask)
    tl.store(param_ptr + offs, _round_to(param, P_DTYPE), mask=mask)


def _chunk_table(numels: list[int], block: int, device: torch.device) -> torch.Tensor:
    """(n_chunks, 2) int32 (tensor index, chunk index) of every BLOCK-element chunk."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(len(numels)), counts)
    starts = torch.cumsum(counts, 0) - counts
    chunk = torch.arange(tensor_index.numel()) - starts[tensor_index]
    return torch.stack([tensor_index, chunk], 1).to(torch.int32).to(device, non_blocking=True)


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
        if p.numel() >= 1 << 33:
            raise ValueError(f"param {k} has too many elements for int32 noise counters")
        if not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError("the fused update needs contiguous params and gradient sums")
    return device


def _launch(kernel, tensors_per_param, metas, numels, device, **kwargs) -> None:
    cfg = config.update_config(device)
    ptrs = torch.tensor([[t.data_ptr() for t in ts] for ts in tensors_per_param], dtype=torch.int64)
    meta = torch.tensor(metas, dtype=torch.int64)
    chunks = _chunk_table(numels, cfg.block, device)
    kernel[(chunks.shape[0],)](
        ptrs.to(device, non_blocking=True),
        meta.to(device, non_blocking=True),
        chunks,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
        **kwargs,
    )


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
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed: int = 0,
    step: int = 0,
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
    for (p_dtype, g_dtype), index in _groups(params, grad_sums).items():
        tensors = [
            (params[k], grad_sums[k], buffers[k] if momentum != 0 else params[k]) for k in index
        ]
        metas = [
            (params[k].numel(), _key(seed, step, streams, k), first[k]) for k in index
        ]  # fmt: skip
        _launch(
            _noisy_sgd_kernel, tensors, metas, [params[k].numel() for k in index], device,
            lr=float(lr), momentum=float(momentum), dampening=float(dampening),
            weight_decay=float(weight_decay), noise_std=float(noise_std), scale=float(scale),
            P_DTYPE=tl_dtype(p_dtype), G_DTYPE=tl_dtype(g_dtype), HAS_MOMENTUM=momentum != 0,
            NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), ADD_NOISE=noise_std > 0,
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
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed: int = 0,
    step: int = 0,
    streams: list[int] | None = None,
) -> None:
    """Triton version of ``noisy_adamw_update_torch`` (``step_count`` is t after this step)."""
    if not (len(params) == len(grad_sums) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError("params, grad_sums, exp_avgs and exp_avg_sqs differ in length")
    device = _check(params, grad_sums, *exp_avgs, *exp_avg_sqs)
    bias_correction1 = 1 - beta1**step_count
    bias_correction2 = 1 - beta2**step_count
    for (p_dtype, g_dtype), index in _groups(params, grad_sums).items():
        tensors = [(params[k], grad_sums[k], exp_avgs[k], exp_avg_sqs[k]) for k in index]
        metas = [(params[k].numel(), _key(seed, step, streams, k), 0) for k in index]
        _launch(
            _noisy_adamw_kernel, tensors, metas, [params[k].numel() for k in index], device,
            lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
            weight_decay=float(weight_decay), step_size=lr / bias_correction1,
            sqrt_bias_correction2=math.sqrt(bias_correction2), noise_std=float(noise_std),
            scale=float(scale), P_DTYPE=tl_dtype(p_dtype), G_DTYPE=tl_dtype(g_dtype),
            MAXIMIZE=bool(maximize), ADD_NOISE=noise_std > 0,
        )  # fmt: skip


def _key(seed: int, step: int, streams: list[int] | None, k: int) -> int:
    return to_int64(mix_key(seed, step, streams[k] if streams is not None else k))
