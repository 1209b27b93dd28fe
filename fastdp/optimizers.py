"""Fused noisy optimizers: noise + scale + SGD/AdamW update in one multi-tensor pass.

``fused_noisy_step`` is what the engine calls once per logical batch: for a plain
``torch.optim.SGD`` / ``torch.optim.AdamW`` (or ``DPSGD`` / ``DPAdamW``) it computes, per
parameter p with a clipped gradient sum, g = (sum_p + N(0, std^2)) * scale with the noise
drawn from Philox stream streams[p] under a ``NoiseKey`` (run secret, step, std), and
applies the group's update through ``fastdp.kernels.noisy_update`` (Triton on CUDA, the
torch reference elsewhere). The DP gradient is never written to ``p.grad``. State stays in
torch's own layout (``momentum_buffer``; ``step`` tensor, ``exp_avg``, ``exp_avg_sq``), so
``state_dict`` round-trips with the plain optimizer. For anything else it returns False and
the caller falls back to ``p.grad`` + ``optimizer.step()``.
"""

from __future__ import annotations

import numbers
from collections import defaultdict

import torch

from fastdp.kernels.noise import NoiseKey
from fastdp.kernels.noisy_update import noisy_adamw_update, noisy_sgd_update

__all__ = ["DPSGD", "DPAdamW", "fused_noisy_step"]


class _NoisyStepMixin:
    def noisy_step(
        self,
        grad_sums: dict[torch.nn.Parameter, torch.Tensor],
        *,
        noise: NoiseKey | None,
        scale: float,
        streams: dict[torch.nn.Parameter, int] | None = None,
    ) -> None:
        """One fused update from gradient sums: clipped (DP-SGD) or not (Noisy-SGD).

        ``noise`` (None: no noise) keys the draw; ``streams`` defaults to each parameter's
        position in ``param_groups``.
        """
        if streams is None:
            params = [p for group in self.param_groups for p in group["params"]]
            streams = {p: k for k, p in enumerate(params)}
        done = fused_noisy_step(self, grad_sums, noise=noise, scale=scale, streams=streams)
        if not done:
            raise ValueError(
                f"{type(self).__name__} has options the fused update does not support "
                "(amsgrad, capturable, differentiable, a Tensor lr or betas, complex params)"
            )


class DPSGD(_NoisyStepMixin, torch.optim.SGD):
    """torch.optim.SGD plus ``noisy_step``: ``step()`` with ``p.grad`` is plain SGD."""


class DPAdamW(_NoisyStepMixin, torch.optim.AdamW):
    """torch.optim.AdamW plus ``noisy_step``: ``step()`` with ``p.grad`` is plain AdamW."""


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, torch.Tensor)


def _supported(optimizer: torch.optim.Optimizer) -> str | None:
    """ "sgd", "adamw", or None when the fused update cannot reproduce ``optimizer.step()``."""
    kind = {
        torch.optim.SGD: "sgd",
        DPSGD: "sgd",
        torch.optim.AdamW: "adamw",
        DPAdamW: "adamw",
    }.get(type(optimizer))
    if kind is None:
        return None
    for group in optimizer.param_groups:
        if group.get("differentiable") or group.get("capturable"):
            return None
        if not _is_number(group["lr"]) or not _is_number(group.get("weight_decay", 0)):
            return None
        if any(p.is_complex() or p.is_sparse for p in group["params"]):
            return None
        if kind == "adamw":
            if group.get("amsgrad") or not group.get("decoupled_weight_decay", True):
                return None
            if not all(_is_number(b) for b in group["betas"]) or not _is_number(group["eps"]):
                return None
        elif not (_is_number(group["momentum"]) and _is_number(group["dampening"])):
            return None
    return kind


def _sgd_group(optimizer, group, params, grad_sums, streams, key) -> None:
    momentum = group["momentum"]
    buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
    new_buffers = noisy_sgd_update(
        params, [grad_sums[p] for p in params], buffers, lr=group["lr"], momentum=momentum,
        dampening=group["dampening"], nesterov=group["nesterov"],
        weight_decay=group["weight_decay"], maximize=group["maximize"],
        streams=[streams[p] for p in params], **key,
    )  # fmt: skip
    if momentum != 0:
        for p, buf in zip(params, new_buffers):
            optimizer.state[p]["momentum_buffer"] = buf


def _new_step_tensor(group, param: torch.Tensor) -> torch.Tensor:
    """Adam's ``step`` state created as torch.optim.AdamW creates it (float32 scalar)."""
    if group.get("fused"):
        return torch.zeros((), dtype=torch.float32, device=param.device)
    return torch.tensor(0.0, dtype=torch.float32)


def _adamw_group(optimizer, group, params, grad_sums, streams, key) -> None:
    by_step: dict[int, list[torch.nn.Parameter]] = defaultdict(list)
    for p in params:
        state = optimizer.state[p]
        if len(state) == 0:
            state["step"] = _new_step_tensor(group, p)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        by_step[int(state["step"].item())].append(p)
    beta1, beta2 = group["betas"]
    for step_count, same in by_step.items():
        noisy_adamw_update(
            same, [grad_sums[p] for p in same], [optimizer.state[p]["exp_avg"] for p in same],
            [optimizer.state[p]["exp_avg_sq"] for p in same], step_count=step_count,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], maximize=group["maximize"],
            streams=[streams[p] for p in same], **key,
        )  # fmt: skip


@torch.no_grad()
def fused_noisy_step(
    optimizer: torch.optim.Optimizer,
    grad_sums: dict[torch.nn.Parameter, torch.Tensor],
    *,
    noise: NoiseKey | None,
    scale: float,
    streams: dict[torch.nn.Parameter, int],
) -> bool:
    """Noisy update of every parameter of ``optimizer`` that has an entry in ``grad_sums``.

    g_p = (grad_sums[p] + N(0, noise.std^2) from stream streams[p] of ``noise``) * scale, then the
    param group's SGD or AdamW step. Parameters without an entry are frozen (skipped). Returns
    False, changing nothing, unless ``optimizer`` is exactly SGD, AdamW, DPSGD or DPAdamW
    without amsgrad / capturable / differentiable and with float hyper-parameters.
    """
    kind = _supported(optimizer)
    if kind is None:
        return False
    key = dict(noise=noise, scale=float(scale))
    update = _sgd_group if kind == "sgd" else _adamw_group
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p in grad_sums]
        by_device: dict[torch.device, list[torch.nn.Parameter]] = defaultdict(list)
        for p in params:
            by_device[p.device].append(p)
        for same_device in by_device.values():
            update(optimizer, group, same_device, grad_sums, streams, key)
    return True
