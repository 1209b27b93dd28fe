"""nn.Embedding: tokens equal within a sample are collapsed, never a B x V x d tensor.

Sample i's weight gradient has one row per distinct token v, sum_{t: x_it = v} g_it, so its
squared norm is sum_v ||sum_{t: x_it = v} g_it||^2: an index_add over (sample, token) keys,
O(B T d) work. Positions holding ``padding_idx`` get no gradient (as in F.embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.rules.base import (
    LayerRule,
    Record,
    buffer_for,
    register_rule,
)


def _flat_tokens(module: nn.Embedding, record: Record):
    """(sample index, token id, g) for every non-padding position, flattened."""
    tokens = record.saved["tokens"]
    batch = tokens.shape[0]
    tokens = tokens.reshape(batch, -1)
    g = record.grad_output.reshape(batch, tokens.shape[1], -1)
    sample = torch.arange(batch, device=tokens.device).unsqueeze(1).expand_as(tokens)
    tokens, sample, g = tokens.reshape(-1), sample.reshape(-1), g.reshape(-1, g.shape[-1])
    if module.padding_idx is not None:
        keep = tokens != module.padding_idx
        tokens, sample, g = tokens[keep], sample[keep], g[keep]
    return sample, tokens, g


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    def forward(self, module: nn.Embedding, input: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # sparse, scale_grad_by_freq and max_norm are refused by check_model
        output = F.embedding(input, module.weight.detach(), module.padding_idx)
        return output, {"tokens": input.detach()}

    def norm_sq(self, record: Record) -> torch.Tensor:
        module = record.module
        batch = record.grad_output.shape[0]
        norms = torch.zeros(batch, dtype=torch.float32, device=record.grad_output.device)
        sample, tokens, g = _flat_tokens(module, record)
        if tokens.numel() == 0:
            return norms
        keys = sample * module.num_embeddings + tokens
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        summed = torch.zeros(
            unique_keys.shape[0], g.shape[1], dtype=torch.float32, device=g.device
        ).index_add_(0, inverse, g.float())
        norms.index_add_(0, unique_keys // module.num_embeddings, summed.square().sum(1))
        return norms

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        module = record.module
        sample, tokens, g = _flat_tokens(module, record)
        rows = g.float() if scale is None else g.float() * scale[sample].unsqueeze(1)
        buffer_for(grads, module.weight).index_add_(0, tokens, rows)
