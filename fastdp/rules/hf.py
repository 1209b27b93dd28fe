"""Hugging Face transformers' ``Conv1D`` (GPT-2's attention and MLP projections).

``Conv1D`` is a Linear with its weight stored transposed: y = x @ W + b with W of shape
(d_in, d_out). Per sample its weight gradient is A_i^T G_i, the transpose of the Linear
gradient G_i^T A_i, so the norms are the Linear rule's (ghost or direct, same rounding) and the
clipped sum is the same clipped GEMM with the operands' roles swapped, written straight into
the (d_in, d_out) buffer. Registered only when transformers imports.
"""

from __future__ import annotations

import torch

from fastdp.kernels.clipped_grad import clipped_linear_grad
from fastdp.rules.base import LayerRule, Record, buffer_for, detached, register_rule, trainable
from fastdp.rules.linear import linear_accumulate, linear_norm_sq, record_operands

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # transformers absent or broken: nothing to register
    Conv1D = None


class HFConv1DRule(LayerRule):
    def forward(self, module, input: torch.Tensor) -> tuple[torch.Tensor, dict]:
        weight, bias = module.weight.detach(), detached(module.bias)
        flat = input.reshape(-1, input.shape[-1])
        if bias is None:
            output = flat @ weight
        else:
            output = torch.addmm(bias, flat, weight)
        output = output.view(*input.shape[:-1], weight.shape[1])
        return output, {"activations": input.detach()}

    def norm_sq(self, record: Record) -> torch.Tensor:
        module = record.module
        return linear_norm_sq(
            *record_operands(record),
            weight=trainable(module, "weight") is not None,
            bias=trainable(module, "bias") is not None,
        )

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        module = record.module
        weight, bias = trainable(module, "weight"), trainable(module, "bias")
        activations, grad_output = record_operands(record)
        if weight is not None:  # (d_in, d_out) += sum_i (c_i A_i)^T G_i
            clipped_linear_grad(grad_output, activations, scale, buffer_for(grads, weight))
        if bias is not None:
            linear_accumulate(activations, grad_output, scale, None, buffer_for(grads, bias))


if Conv1D is not None:
    register_rule(Conv1D)(HFConv1DRule)
