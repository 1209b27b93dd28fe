"""nn.Conv1d and nn.Conv2d with any stride, padding (numbers, 'same', 'valid', any padding
mode), dilation and groups.

Norms go through the unfolded view: per group, A_i is (L, C_in/groups * k) and G_i is
(L, C_out/groups), which is a linear map over L positions, so the ghost/direct choice of the
linear rule applies unchanged (groups are folded into the batch axis). The clipped weight
gradient is the ordinary convolution weight gradient of the row-scaled G: one GEMM-like call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.kernels.certified_norm import (
    U32,
    U64,
    round_up_f32,
)
from fastdp.kernels.clipped_bound import clipped_bias_bound_sq, clipped_weight_bound_sq
from fastdp.kernels.rounding import samples_per_call
from fastdp.rules.base import (
    LayerRule,
    Record,
    buffer_for,
    detached,
    group_tokens,
    register_rule,
    rows_scale,
    trainable,
)


def padded_input(
    module: nn.Conv1d | nn.Conv2d, input: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(input, padding) such that a zero-padded convolution with ``padding`` reproduces the
    module: symmetric zero padding is passed through (no copy), anything else ('same' with an
    even kernel, reflect/replicate/circular) is applied explicitly and the padding becomes 0."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return input, tuple(module.padding)
    zeros = (0,) * len(module.kernel_size)
    pad = module._reversed_padding_repeated_twice
    if not any(pad):
        return input, zeros
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(input, pad, mode=mode), zeros


def _as_2d(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, padding: tuple[int, ...]):
    """Conv1d viewed as a Conv2d of height 1: (x, kernel, stride, dilation, padding) in 2-D."""
    if isinstance(module, nn.Conv1d):
        return (
            x.unsqueeze(2),
            (1, module.kernel_size[0]),
            (1, module.stride[0]),
            (1, module.dilation[0]),
            (0, padding[0]),
        )
    return x, module.kernel_size, module.stride, module.dilation, padding


def unfolded(
    module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, padding: tuple[int, ...]
) -> torch.Tensor:
    """(B * groups, L, C_in/groups * prod(kernel)): each sample-group as a linear map's input."""
    x2d, kernel, stride, dilation, padding = _as_2d(module, x, padding)
    cols = F.unfold(x2d, kernel, dilation=dilation, padding=padding, stride=stride)
    batch, _, length = cols.shape
    groups = module.groups
    cols = cols.view(batch, groups, -1, length).transpose(2, 3)
    return cols.reshape(batch * groups, length, -1)


def grouped_grad_output(module: nn.Conv1d | nn.Conv2d, grad_output: torch.Tensor) -> torch.Tensor:
    """(B * groups, L, C_out/groups) from G of shape (B, C_out, *spatial)."""
    batch, channels = grad_output.shape[:2]
    groups = module.groups
    g = grad_output.reshape(batch, groups, channels // groups, -1).transpose(2, 3)
    return g.reshape(batch * groups, -1, channels // groups)


def views_as_positions(t: torch.Tensor, views: int, groups: int) -> torch.Tensor:
    """(B*K*groups, L, n) -> (B*groups, K*L, n): a sample's K views as K*L positions of each
    of its groups (augmentation multiplicity), so the linear norm covers the sum over views."""
    if views == 1:
        return t
    rows, length, n = t.shape
    batch = rows // (views * groups)
    t = t.view(batch, views, groups, length, n).transpose(1, 2)
    return t.reshape(batch * groups, views * length, n)


def _conv_rounding(device: torch.device, dtype: torch.dtype) -> float:
    """rho of the clipped convolution: c * G rounded to float32, then both operands to tf32
    when cuDNN may use it (CUDA, torch.backends.cudnn.allow_tf32). The reduction over a call's
    rows (whole samples, rounding.samples_per_call) is rounding.accumulation_excess, applied by
    clipped_weight_bound_sq."""
    u_in = 2.0**-11 if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else 0.0
    if dtype == torch.float64:  # float64 inputs are scaled and reduced in float64
        return U64
    return (1.0 + U32) * (1.0 + u_in) ** 2 - 1.0


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(LayerRule):
    def forward(self, module, input: torch.Tensor) -> tuple[torch.Tensor, dict]:
        output = module._conv_forward(input, module.weight.detach(), detached(module.bias))
        return output, {"input": input.detach()}

    def norm_sq(self, record: Record) -> torch.Tensor:
        """Certified, rounded up (kernels/per_sample_norm.py has the argument): the unfolded
        weight bound per group plus the bias bound; the clipped weight gradient is a float32
        convolution of c * G (rounded once: rho = u32, and tf32 operands on CUDA when cuDNN
        allows them)."""
        module = record.module
        grad_output, views = record.grad_output, record.group
        batch = record.batch_size
        norms = torch.zeros(batch, dtype=torch.float64, device=grad_output.device)
        if trainable(module, "weight") is not None:
            cols = unfolded(module, *padded_input(module, record.saved["input"]))
            grads = grouped_grad_output(module, grad_output)
            rho = _conv_rounding(grad_output.device, grad_output.dtype)
            per_group = clipped_weight_bound_sq(
                views_as_positions(cols, views, module.groups),
                views_as_positions(grads, views, module.groups),
                rho=rho,
            )
            norms += per_group.view(batch, module.groups).sum(1)
        if trainable(module, "bias") is not None:
            tokens = grad_output.flatten(2).transpose(1, 2)
            norms += clipped_bias_bound_sq(group_tokens(tokens, views))
        return round_up_f32(norms * (1.0 + 2.0**-50))

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        module = record.module
        weight, bias = trainable(module, "weight"), trainable(module, "bias")
        # float64 inputs are reduced in float64; float32 ones in float32, added to the float64
        # buffer once per call
        work = torch.float64 if record.grad_output.dtype == torch.float64 else torch.float32
        grad_output = record.grad_output.to(work)
        scale = rows_scale(scale, record.group)  # every view of sample i gets c_i
        if scale is not None:
            grad_output = grad_output * scale.view((-1,) + (1,) * (grad_output.dim() - 1))
        if weight is not None:
            x, padding = padded_input(module, record.saved["input"])
            grad_fn = (
                torch.nn.grad.conv1d_weight
                if isinstance(module, nn.Conv1d)
                else torch.nn.grad.conv2d_weight
            )
            per_call = samples_per_call(grad_output[0, 0].numel())
            buffer = buffer_for(grads, weight)
            x = x.to(work)
            for start in range(0, grad_output.shape[0], per_call):
                end = start + per_call
                buffer.add_(
                    grad_fn(
                        x[start:end],
                        weight.shape,
                        grad_output[start:end],
                        stride=module.stride,
                        padding=padding,
                        dilation=module.dilation,
                        groups=module.groups,
                    )
                )
        if bias is not None:
            per_call = samples_per_call(grad_output[0, 0].numel())
            buffer = buffer_for(grads, bias)
            for start in range(0, grad_output.shape[0], per_call):
                buffer.add_(grad_output[start : start + per_call].flatten(2).sum((0, 2)))
