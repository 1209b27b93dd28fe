"""LayerNorm, GroupNorm and RMSNorm: per-sample gradients are small vectors, materialised.

Each layer is computed as x_hat * weight + bias with x_hat the parameter-free normalisation,
so autograd differentiates through x_hat only; the per-sample weight gradient is the sum of
G * x_hat over the non-parameter positions, the bias gradient the sum of G.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.kernels.certified_norm import U32, U64, gamma, round_up_f32
from fastdp.rules.base import (
    LayerRule,
    Record,
    buffer_for,
    concat_positions,
    merged_record,
    register_rule,
    sum_views,
    trainable,
)


def _per_sample_affine_grads(record: Record) -> dict[str, torch.Tensor]:
    """{'weight': (B, *param_shape), 'bias': ...} float32 per-sample gradients (the sum over
    a sample's views when ``record.group`` > 1)."""
    module = record.module
    g = record.grad_output.float()
    x_hat = record.saved["x_hat"].float()
    batch = g.shape[0]
    if isinstance(module, nn.GroupNorm):
        channels = module.num_channels
        g = g.reshape(batch, channels, -1)
        x_hat = x_hat.reshape(batch, channels, -1)
        reduce_dims = (2,)
    else:  # LayerNorm / RMSNorm: parameters cover the trailing normalized_shape
        size = x_hat.shape[x_hat.dim() - len(module.normalized_shape) :].numel()
        g = g.reshape(batch, -1, size)
        x_hat = x_hat.reshape(batch, -1, size)
        reduce_dims = (1,)
    grads = {}
    if trainable(module, "weight") is not None:
        grads["weight"] = sum_views((g * x_hat).sum(reduce_dims), record.group)
    if trainable(module, "bias") is not None:
        grads["bias"] = sum_views(g.sum(reduce_dims), record.group)
    return grads


class AffineNormRule(LayerRule):
    def normalise(self, module: nn.Module, input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def affine_shape(self, module: nn.Module, input: torch.Tensor) -> tuple[int, ...]:
        return tuple(module.normalized_shape)

    def forward(self, module: nn.Module, input: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x_hat = self.normalise(module, input)
        output = x_hat
        shape = self.affine_shape(module, input)
        if getattr(module, "weight", None) is not None:
            output = output * module.weight.detach().view(shape)
        if getattr(module, "bias", None) is not None:
            output = output + module.bias.detach().view(shape)
        return output, {"x_hat": x_hat.detach()}

    def positions(self, module: nn.Module, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(tensor with the positions the affine parameters are shared over in one axis,
        that axis): (B, T, *normalized_shape), axis 1."""
        return tensor.reshape(tensor.shape[0], -1, *module.normalized_shape), 1

    def merge(self, records: list[Record]) -> Record:
        """Several calls of one norm layer: positions of all calls side by side."""
        module = records[0].module
        dim = self.positions(module, records[0].grad_output)[1]
        return merged_record(
            records,
            "x_hat",
            *concat_positions(records, "x_hat", lambda t: self.positions(module, t)[0], dim),
        )

    def norm_sq(self, record: Record) -> torch.Tensor:
        """Certified, rounded up: ``accumulate`` adds c * v_i for the very per-sample vectors
        v_i computed here (same float32 ops on the same tensors), each product c * v rounded
        once (u32), so ||added|| <= c ||v_i|| (1 + u32); ||v_i||^2 is summed in float64
        (relative error <= gamma64_n)."""
        norms = torch.zeros(
            record.batch_size, dtype=torch.float64, device=record.grad_output.device
        )
        size = 16
        for grad in _per_sample_affine_grads(record).values():
            norms += torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float64).square()
            size += grad[0].numel()
        inflate = (1 + U32) ** 2 * (1 + 4 * gamma(size, U64))
        return round_up_f32(norms * inflate)

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        for name, per_sample in _per_sample_affine_grads(record).items():
            param = getattr(record.module, name)
            per_sample = per_sample.reshape(-1, *param.shape)  # multi-dim normalized_shape
            if scale is None:
                buffer_for(grads, param).add_(per_sample.sum(0))
            else:
                buffer_for(grads, param).add_(torch.einsum("b,b...->...", scale, per_sample))


@register_rule(nn.LayerNorm)
class LayerNormRule(AffineNormRule):
    def normalise(self, module: nn.LayerNorm, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, module.normalized_shape, None, None, module.eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(AffineNormRule):
    def normalise(self, module: nn.GroupNorm, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, module.num_groups, None, None, module.eps)

    def affine_shape(self, module: nn.GroupNorm, input: torch.Tensor) -> tuple[int, ...]:
        return (1, module.num_channels) + (1,) * (input.dim() - 2)

    def positions(self, module: nn.GroupNorm, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        return tensor.reshape(tensor.shape[0], module.num_channels, -1), 2


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    class RMSNormRule(AffineNormRule):
        def normalise(self, module: nn.RMSNorm, input: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(input, module.normalized_shape, None, module.eps)
