"""nn.Linear on inputs of any rank (B, ..., d): the positions between B and d form T."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.kernels.certified_norm import (
    round_up_f32,
)
from fastdp.kernels.clipped_bound import clipped_bias_bound_sq, clipped_weight_bound_sq
from fastdp.kernels.clipped_grad import clipped_linear_grad
from fastdp.rules.base import (
    LayerRule,
    Record,
    buffer_for,
    concat_positions,
    detached,
    group_tokens,
    merged_record,
    register_rule,
    trainable,
)


def as_btd(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle dimensions (1 for 2-D)."""
    if tensor.dim() < 2:
        raise ValueError(f"expected a batch-first tensor with >= 2 dims, got {tuple(tensor.shape)}")
    n_tokens = tensor.shape[1:-1].numel()
    return tensor.reshape(tensor.shape[0], n_tokens, tensor.shape[-1])


def record_operands(record: Record, key: str = "activations") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, G) as (B, T, d) and (B, T, p); a sample's K views (``record.group``) are K*T
    positions of that sample."""
    group = record.group
    return (
        group_tokens(as_btd(record.saved[key]), group),
        group_tokens(as_btd(record.grad_output), group),
    )


def linear_norm_sq(
    activations: torch.Tensor, grad_outputs: torch.Tensor, weight: bool, bias: bool
) -> torch.Tensor:
    """(B,) float32 certified squared per-sample norms of a linear map's weight and/or bias
    gradients, rounded up: never below the squared norm of what the clipped GEMM adds per unit
    of clip factor, rounding included (the argument is in kernels/per_sample_norm.py).

    A: (B, T, d), G: (B, T, p). Weight: ghost or direct, whichever is cheaper for these shapes,
    plus its rounding bound (T = 1: ||a||^2 ||g||^2 from float64 row norms, no cancellation);
    bias: ||sum_t g_t||^2 summed in float64, plus its rounding bound.
    """
    norms = clipped_weight_bound_sq(activations, grad_outputs) if weight else None
    if bias:
        bias_sq = clipped_bias_bound_sq(grad_outputs)
        norms = bias_sq if norms is None else norms.add_(bias_sq)
    if norms is None:
        return torch.zeros(grad_outputs.shape[0], dtype=torch.float32, device=grad_outputs.device)
    return round_up_f32(norms.mul_(1.0 + 2.0**-50))


def linear_accumulate(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    scale: torch.Tensor | None,
    weight_buf: torch.Tensor | None,
    bias_buf: torch.Tensor | None,
) -> None:
    """weight_buf += sum_i scale_i G_i^T A_i; bias_buf += sum_i scale_i sum_t g_it."""
    if weight_buf is not None:
        clipped_linear_grad(activations, grad_outputs, scale, weight_buf, bias_buf)
    elif bias_buf is not None:
        per_sample = grad_outputs.float().sum(1)
        bias_buf.add_(per_sample.sum(0) if scale is None else scale @ per_sample)


def merge_linear(records: list[Record]) -> Record:
    """Several calls of one linear map: their (B, T_c, d) operands side by side, (B, sum T_c, d)
    (G_i^T A_i is a sum over positions)."""
    return merged_record(records, "activations", *concat_positions(records, "activations", as_btd))


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    merge = staticmethod(merge_linear)

    def forward(self, module: nn.Linear, input: torch.Tensor) -> tuple[torch.Tensor, dict]:
        output = F.linear(input, module.weight.detach(), detached(module.bias))
        return output, {"activations": input.detach()}

    def norm_sq(self, record: Record) -> torch.Tensor:
        module = record.module
        norms = linear_norm_sq(
            *record_operands(record),
            weight=trainable(module, "weight") is not None,
            bias=trainable(module, "bias") is not None,
        )
        return norms

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        module = record.module
        weight, bias = trainable(module, "weight"), trainable(module, "bias")
        linear_accumulate(
            *record_operands(record),
            scale,
            buffer_for(grads, weight) if weight is not None else None,
            buffer_for(grads, bias) if bias is not None else None,
        )
