"""Noisy optimizer update: g = (sum + N(0, std^2)) * scale, then an SGD or AdamW step.

Multi-tensor: one call updates every parameter. The formulas match torch.optim.SGD and
torch.optim.AdamW exactly (same state layout: ``momentum_buffer``; ``exp_avg``,
``exp_avg_sq``), so a fused optimizer's state_dict loads into the plain one and back. The noise
of tensor k is Philox stream ``streams[k]`` (default k) under ``noise: NoiseKey`` (run secret,
logical step, std; see ``noise.py``); ``noise=None`` or std 0 adds none. This module holds the
torch reference; the Triton kernel is in noisy_update_triton.py.
"""

from __future__ import annotations

import torch

from fastdp.kernels.dispatch import use_triton
from fastdp.kernels.noise import NoiseKey, philox_normal


def noisy_gradient_torch(
    grad_sum: torch.Tensor, *, noise: NoiseKey | None, scale: float, stream: int
) -> torch.Tensor:
    """float32 (grad_sum + noise) * scale: the DP gradient of one parameter."""
    g = grad_sum.float()
    if noise is None or not noise.adds_noise:
        return g * scale
    xi = philox_normal(g.shape, noise, stream).to(g.device)  # drawn on the CPU
    # scale * g + (std * scale) * xi, in place on the fresh noise tensor
    return xi.mul_(noise.std * scale).add_(g, alpha=scale)


def noisy_gradients_torch(
    grad_sums: list[torch.Tensor],
    *,
    noise: NoiseKey | None,
    scale: float,
    streams: list[int],
    dtypes: list[torch.dtype],
) -> list[torch.Tensor]:
    """``noisy_gradient_torch`` of every tensor, with multi-tensor ops (the same elementwise
    arithmetic, so the same values; a few launches instead of a few per tensor)."""
    gs = [g.float() for g in grad_sums]
    if noise is None or not noise.adds_noise:
        out = torch._foreach_mul(gs, scale)
    else:
        out = [philox_normal(g.shape, noise, k).to(g.device) for g, k in zip(gs, streams)]
        torch._foreach_mul_(out, noise.std * scale)
        torch._foreach_add_(out, gs, alpha=scale)
    return [g if g.dtype == dt else g.to(dt) for g, dt in zip(out, dtypes)]


@torch.no_grad()
def noisy_sgd_update_torch(
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
    """Torch reference (multi-tensor, as torch.optim.SGD's foreach path); returns the momentum
    buffers (created on first use, as torch SGD)."""
    if not params:
        return []
    streams = list(range(len(params))) if streams is None else streams
    gs = noisy_gradients_torch(
        grad_sums, noise=noise, scale=scale, streams=streams, dtypes=[p.dtype for p in params]
    )
    if maximize:
        gs = torch._foreach_neg(gs)
    if weight_decay != 0:
        gs = torch._foreach_add(gs, params, alpha=weight_decay)
    buffers = list(momentum_buffers)
    if momentum != 0:
        fresh = [k for k, buf in enumerate(buffers) if buf is None]
        for k in fresh:
            buffers[k] = gs[k].clone()
        old = [k for k in range(len(params)) if k not in set(fresh)]
        if old:
            kept = [buffers[k] for k in old]
            torch._foreach_mul_(kept, momentum)
            torch._foreach_add_(kept, [gs[k] for k in old], alpha=1 - dampening)
        gs = torch._foreach_add(gs, buffers, alpha=momentum) if nesterov else buffers
    torch._foreach_add_(params, gs, alpha=-lr)
    return buffers


@torch.no_grad()
def noisy_adamw_update_torch(
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
    """Torch reference. ``step_count`` is Adam's t after this update (1 on the first)."""
    bias_correction1 = 1 - beta1**step_count
    bias_correction2 = 1 - beta2**step_count
    for k, (p, grad_sum, m, v) in enumerate(zip(params, grad_sums, exp_avgs, exp_avg_sqs)):
        stream = streams[k] if streams is not None else k
        g = noisy_gradient_torch(grad_sum, noise=noise, scale=scale, stream=stream).to(p.dtype)
        if maximize:
            g = -g
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)  # as torch.optim.AdamW
        p.addcdiv_(m, denom, value=-lr / bias_correction1)


def noisy_sgd_update(params, grad_sums, momentum_buffers, **kwargs):
    """Dispatching entry point; same arguments and result as ``noisy_sgd_update_torch``."""
    if params and use_triton(*params):
        from fastdp.kernels import noisy_update_triton

        return noisy_update_triton.noisy_sgd_update(params, grad_sums, momentum_buffers, **kwargs)
    return noisy_sgd_update_torch(params, grad_sums, momentum_buffers, **kwargs)


def noisy_adamw_update(params, grad_sums, exp_avgs, exp_avg_sqs, **kwargs):
    """Dispatching entry point; same arguments as ``noisy_adamw_update_torch``."""
    if params and use_triton(*params):
        from fastdp.kernels import noisy_update_triton

        return noisy_update_triton.noisy_adamw_update(
            params, grad_sums, exp_avgs, exp_avg_sqs, **kwargs
        )
    return noisy_adamw_update_torch(params, grad_sums, exp_avgs, exp_avg_sqs, **kwargs)
