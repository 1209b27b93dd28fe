"""PEFT's DoRA magnitude on a Linear adapter (``peft.tuners.lora.dora.DoraLinearLayer``).

DoRA (Liu et al. 2024) adds to the base output y0 = x W^T

    (m / n - 1) * y0 + (m / n) * s * B(A(x)),   n = ||W + s B A||_row (detached, DoRA §4.3),

with m the trainable magnitude (one per output feature). The output is affine in m, so the
per-sample gradient of m is sum_t G_t * u_t with u = (y0 + s B(A(x))) / n, a small (B, d_out)
tensor materialised like a norm layer's; lora_A and lora_B are called on x as ordinary
(routed) layers and get their own per-sample gradients through the detached factor m / n.

peft computes n from ``lora_B(lora_A(eye))``, calls of the two layers on an identity matrix
that are never differentiated (n is detached); the rule computes that product as
``lora_B.weight @ lora_A.weight`` without calling them, so no call outside the batch exists.
Registered by qualified name: peft is not imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.rules.base import LayerRule, Record, buffer_for, register_rule, sum_views


def _base_weight(base_layer: nn.Module) -> torch.Tensor:
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(base_layer)


@register_rule("peft.tuners.lora.dora.DoraLinearLayer")
class DoraLinearRule(LayerRule):
    def forward(
        self,
        module: nn.Module,
        x: torch.Tensor,
        *,
        lora_A: nn.Module,
        lora_B: nn.Module,
        scaling: float,
        base_layer: nn.Module,
        base_result: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict]:
        if getattr(lora_A, "bias", None) is not None or getattr(lora_B, "bias", None) is not None:
            raise ValueError(
                "fastdp's DoRA rule expects LoRA factors without bias (peft lora_bias=False)"
            )
        if any(p.requires_grad for p in base_layer.parameters(recurse=False)):
            # DoRA's output reads the base weight and bias outside the base layer's call (its
            # own F.linear, base_result - bias): they would get gradients no rule clips
            raise ValueError(
                "fastdp's DoRA rule needs the adapted base layer frozen (peft's default, "
                "bias='none'): its weight and bias are also used inside the DoRA magnitude's "
                "forward, where fastdp has no per-sample gradient for them. Freeze them, or "
                "use plain LoRA with a trainable bias."
            )
        with torch.no_grad():  # peft's weight norm is detached: nothing to differentiate
            weight = _base_weight(base_layer).to(x.dtype)
            lora_weight = (lora_B.weight @ lora_A.weight).to(x.dtype)
            if module.fan_in_fan_out:
                weight = weight.T
            weight_norm = torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(x.dtype)
        factor = (module.weight.detach() / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if base_layer.bias is not None:
                base_result = base_result - base_layer.bias
        else:
            base_result = F.linear(x, weight)
        output = (factor - 1) * base_result + factor * lora_result * scaling
        direction = (base_result + lora_result * scaling) / weight_norm  # d output / d m
        return output, {"direction": direction.detach()}

    def _per_sample(self, record: Record) -> torch.Tensor:
        """(B, d_out) float32 per-sample gradients of the magnitude."""
        g, u = record.grad_output.float(), record.saved["direction"].float()
        rows = g.shape[0]
        per_row = (g * u).reshape(rows, -1, g.shape[-1]).sum(1)
        return sum_views(per_row, record.group)

    def norm_sq(self, record: Record) -> torch.Tensor:
        from fastdp.rules.generic import rounded_up_norm_sq

        per_sample = self._per_sample(record)
        record.extra["per_sample"] = per_sample  # accumulate adds exactly these
        return rounded_up_norm_sq([per_sample], record.batch_size, record.grad_output)

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        per_sample = record.extra.pop("per_sample", None)
        if per_sample is None:
            per_sample = self._per_sample(record)
        buffer = buffer_for(grads, record.module.weight)
        if scale is None:
            buffer.add_(per_sample.sum(0))
        else:  # dropped samples (scale 0) may hold NaN: 0 * NaN must not reach the sum
            keep = (scale != 0).unsqueeze(1)
            per_sample = torch.where(keep, per_sample, torch.zeros((), device=per_sample.device))
            buffer.add_(scale.float() @ per_sample)
