"""nn.Conv3d and the transposed convolutions (ConvTranspose1d/2d/3d).

Both go through an unfolded view and the linear rule, per group: sample i's weight gradient
is a linear map's gradient over L positions, so its norm is ``linear_norm_sq`` (ghost or
direct, certified rounding) and the clipped sum is the clipped linear GEMM on the same
operands, written into the weight buffer viewed per group.

- Conv3d: A_i = unfolded input (L, C_in/g * k), G_i = output gradient (L, C_out/g).
- ConvTranspose: its weight gradient is that of an ordinary convolution that maps the output
  gradient G back to the input x with the same stride, padding and dilation (the adjoint):
  A_i = unfolded G_i (L_in, C_out/g * k), and x_i (L_in, C_in/g) plays the output gradient,
  which matches the (C_in, C_out/g, *k) weight layout.
The unfolded tensor costs B * L * C * prod(k) memory, as Opacus's unfold path does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.kernels.clipped_grad import clipped_linear_grad
from fastdp.rules.base import (
    LayerRule,
    Record,
    buffer_for,
    detached,
    group_tokens,
    register_rule,
    trainable,
)
from fastdp.rules.conv import padded_input
from fastdp.rules.linear import linear_norm_sq


def unfold_nd(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    sizes: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """(B, L, C * prod(kernel)) sliding windows of x (B, C, *spatial), zero-padded, channel-
    major like a weight (C, *kernel); ``sizes`` crops the window grid (transposed convs)."""
    n = len(kernel)
    if any(padding):
        x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    for dim in range(n):
        span = dilation[dim] * (kernel[dim] - 1) + 1
        x = x.unfold(2 + dim, span, stride[dim])
        if dilation[dim] > 1:
            x = x[..., :: dilation[dim]]
        if sizes is not None:
            x = x.narrow(2 + dim, 0, sizes[dim])
    batch, channels = x.shape[:2]
    grid = x.shape[2 : 2 + n]
    x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    return x.reshape(batch, math.prod(grid), channels * math.prod(kernel))


def _per_group(t: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """(B, L, groups * n) -> groups tensors (B, L, n)."""
    return list(t.reshape(t.shape[0], t.shape[1], groups, -1).unbind(2))


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, L, C)."""
    return t.flatten(2).transpose(1, 2)


class _UnfoldedConvRule(LayerRule):
    """Shared norm/accumulate; subclasses say which tensors play A and G."""

    def operands(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, G) of the per-sample linear maps, (B, L, groups * n) each."""
        raise NotImplementedError

    def sample_operands(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """``operands`` with a sample's K views as K*L positions (B, K*L, groups * n)."""
        cols, grads = self.operands(record)
        return group_tokens(cols, record.group), group_tokens(grads, record.group)

    def norm_sq(self, record: Record) -> torch.Tensor:
        module = record.module
        grad_output = record.grad_output
        batch = record.batch_size
        norms = torch.zeros(batch, dtype=torch.float32, device=grad_output.device)
        if trainable(module, "weight") is not None:
            cols, grads = self.sample_operands(record)
            for a, g in zip(_per_group(cols, module.groups), _per_group(grads, module.groups)):
                norms += linear_norm_sq(a, g, weight=True, bias=False)
        if trainable(module, "bias") is not None:
            tokens = group_tokens(_tokens(grad_output), record.group)
            norms += linear_norm_sq(None, tokens, weight=False, bias=True)
        return norms

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        module = record.module
        weight, bias = trainable(module, "weight"), trainable(module, "bias")
        if weight is not None:
            cols, grad = self.sample_operands(record)
            groups = module.groups
            buf = buffer_for(grads, weight)
            per_group_buf = buf.view(groups, weight.shape[0] // groups, -1)
            pairs = zip(_per_group(cols, groups), _per_group(grad, groups))
            for j, (a, g) in enumerate(pairs):
                clipped_linear_grad(a, g, scale, per_group_buf[j])
        if bias is not None:
            g = group_tokens(_tokens(record.grad_output), record.group).float()
            per_sample = g.sum(1)
            buffer_for(grads, bias).add_(per_sample.sum(0) if scale is None else scale @ per_sample)


@register_rule(nn.Conv3d)
class Conv3dRule(_UnfoldedConvRule):
    def forward(self, module: nn.Conv3d, input: torch.Tensor) -> tuple[torch.Tensor, dict]:
        output = module._conv_forward(input, module.weight.detach(), detached(module.bias))
        return output, {"input": input.detach()}

    def operands(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        module = record.module
        x, padding = padded_input(module, record.saved["input"])
        cols = unfold_nd(x, module.kernel_size, module.stride, module.dilation, padding)
        return cols, _tokens(record.grad_output)


_TRANSPOSED = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


@register_rule(*_TRANSPOSED)
class ConvTransposeRule(_UnfoldedConvRule):
    def forward(self, module, input: torch.Tensor, output_size=None) -> tuple[torch.Tensor, dict]:
        n_spatial = len(module.kernel_size)
        output_padding = module._output_padding(
            input, output_size, module.stride, module.padding, module.kernel_size,
            n_spatial, module.dilation,
        )  # fmt: skip
        output = _TRANSPOSED[type(module)](
            input,
            module.weight.detach(),
            detached(module.bias),
            module.stride,
            module.padding,
            output_padding,
            module.groups,
            module.dilation,
        )
        return output, {"input": input.detach()}

    def operands(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        module = record.module
        x = record.saved["input"]
        sizes = tuple(x.shape[2:])
        cols = unfold_nd(
            record.grad_output, module.kernel_size, module.stride, module.dilation,
            module.padding, sizes,
        )  # fmt: skip
        return cols, _tokens(x)
