"""Hugging Face transformers' ``Conv1D`` (GPT-2's attention and MLP projections).

``Conv1D`` is a Linear with its weight stored transposed: y = x @ W + b with W of shape
(d_in, d_out). Per sample its weight gradient is A_i^T G_i, the transpose of the Linear
gradient G_i^T A_i, so the norms are the Linear rule's (ghost or direct, same rounding) and the
clipped sum is the same clipped GEMM with the operands' roles swapped, written straight into
the (d_in, d_out) buffer. Registered by qualified name (transformers is not imported).

T5's relative attention bias is an Embedding called on (q, k) bucket ids without a batch
axis; ``patch_t5_attention`` makes make_private call it on the ids expanded to the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdp.kernels.clipped_grad import clipped_linear_grad
from fastdp.rules.base import (
    LayerRule,
    Record,
    buffer_for,
    detached,
    register_rule,
    trainable,
)
from fastdp.rules.linear import linear_accumulate, linear_norm_sq, merge_linear, record_operands


@register_rule("transformers.pytorch_utils.Conv1D")
class HFConv1DRule(LayerRule):
    merge = staticmethod(merge_linear)

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


# ---- T5's relative attention bias --------------------------------------------------------------
class _BucketCatcher(nn.Module):
    """Stands in for ``relative_attention_bias`` while T5's own ``compute_bias`` runs: it keeps
    the (q, k) bucket ids and returns them as (q, k, 1), which compute_bias lays out as
    (1, 1, q, k), so the layout it gives its values can be checked."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.bucket: torch.Tensor | None = None
        object.__setattr__(self, "_embedding", embedding)  # not a child: nothing registered

    @property
    def weight(self) -> torch.Tensor:  # compute_bias reads the device from it
        return self._embedding.weight

    def forward(self, bucket: torch.Tensor) -> torch.Tensor:
        self.bucket = bucket
        return bucket.unsqueeze(-1)


class _BatchedBias:
    """The instance-level ``forward`` and ``compute_bias`` of one T5-style attention: forward
    notes the batch size of its hidden states, compute_bias calls the bias embedding on the
    bucket ids expanded to that batch. T5 calls it on (q, k) ids and broadcasts the (1, H, q, k)
    bias over the batch, where no per-sample gradient exists; (B, H, q, k) has one (the same
    values). Batched in every pass, with autograd on or off, so that a reentrant checkpoint's
    no-grad forward and its recomputation give the same shapes."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.original_forward = attention.forward
        self.original_bias = attention.compute_bias
        self.batch: int | None = None

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) else None
        try:
            return self.original_forward(*args, **kwargs)
        finally:
            self.batch = None

    def compute_bias(self, *args, **kwargs):
        attention, batch = self.attention, self.batch
        if batch is None:  # called outside the attention's forward
            return self.original_bias(*args, **kwargs)
        embedding = attention._modules["relative_attention_bias"]
        catcher = _BucketCatcher(embedding)
        attention._modules["relative_attention_bias"] = catcher
        try:
            layout = self.original_bias(*args, **kwargs)
        finally:
            attention._modules["relative_attention_bias"] = embedding
        bucket = catcher.bucket
        if (
            bucket is None
            or layout.shape != (1, 1, *bucket.shape)
            or not torch.equal(layout[0, 0], bucket)
        ):
            raise RuntimeError(
                f"fastdp: {type(attention).__qualname__}.compute_bias does not lay out the "
                "relative bias as T5 does (values.permute(2, 0, 1).unsqueeze(0)), so fastdp "
                "cannot give it a batch axis. Freeze relative_attention_bias "
                "(requires_grad_(False))."
            )
        values = embedding(bucket.expand(batch, *bucket.shape))  # (B, q, k, H)
        return values.permute(0, 3, 1, 2)


def patch_t5_attention(model: nn.Module) -> None:
    """Give every T5-style attention (a ``compute_bias`` method and a trainable
    ``relative_attention_bias`` Embedding: T5, mT5, UMT5, LongT5, Switch Transformers, ...)
    the batched relative bias (instance attributes; the class is untouched). One whose
    compute_bias lays the values out differently is refused at its first call."""
    for module in model.modules():
        bias = getattr(module, "relative_attention_bias", None)
        if (
            callable(getattr(module, "compute_bias", None))
            and isinstance(bias, nn.Embedding)
            and bias.weight.requires_grad
            and "compute_bias" not in module.__dict__
        ):
            patched = _BatchedBias(module)
            module.forward, module.compute_bias = patched.forward, patched.compute_bias
