"""nn.Embedding: tokens equal within a sample are collapsed, never a B x V x d tensor.

Sample i's weight gradient has one row per distinct token v, sum_{t: x_it = v} g_it, so its
squared norm is sum_v ||sum_{t: x_it = v} g_it||^2: an index_add over (sample, token) keys,
O(B T d) work. Positions holding ``padding_idx`` get no gradient (as in F.embedding).
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
    register_rule,
)


def _flat_tokens(module: nn.Embedding, record: Record):
    """(sample index, token id, g) for every non-padding position, flattened; the K views of
    a sample (``record.group``) share its index."""
    tokens = record.saved["tokens"]
    rows = tokens.shape[0]
    tokens = tokens.reshape(rows, -1)
    g = record.grad_output.reshape(rows, tokens.shape[1], -1)
    sample = torch.arange(rows, device=tokens.device) // record.group
    sample = sample.unsqueeze(1).expand_as(tokens)
    tokens, sample, g = tokens.reshape(-1), sample.reshape(-1), g.reshape(-1, g.shape[-1])
    if module.padding_idx is not None:
        keep = tokens != module.padding_idx
        tokens, sample, g = tokens[keep], sample[keep], g[keep]
    return sample, tokens, g


def embedding_norm_sq(
    sample: torch.Tensor, tokens: torch.Tensor, g: torch.Tensor, batch: int, n_rows: int
) -> torch.Tensor:
    """(B,) float32 certified squared norms, rounded up, of what ``accumulate`` adds per unit
    of clip factor: rows sum_t fl(c g_t), c * g rounded once in float32 (u32).

    The rows are summed in float64 (index_add, any order: error <= gamma64_T sum_t ||g_t||
    in Frobenius norm), so sqrt(N_added) <= ||rows64|| (1 + gamma64) + (gamma64_T + u32) M,
    M = sum_t ||g_t||: a direct method, nothing to cancel beyond float64 rounding.
    """
    norms = torch.zeros(batch, dtype=torch.float64, device=g.device)
    if tokens.numel() == 0:
        return norms.float()
    keys = sample * n_rows + tokens
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(
        unique_keys.shape[0], g.shape[1], dtype=torch.float64, device=g.device
    ).index_add_(0, inverse, g.double())
    norms.index_add_(0, unique_keys // n_rows, summed.square().sum(1))
    mags = torch.zeros_like(norms).index_add_(
        0, sample, torch.linalg.vector_norm(g, dim=1, dtype=torch.float64)
    )
    n_all = sample.shape[0] + g.shape[1] + 16
    slack = gamma(n_all, U64) + U32
    bound = (norms.sqrt() * (1 + 4 * gamma(n_all, U64)) + slack * mags).square()
    return round_up_f32(bound * (1 + 2.0**-48))


def _micro_batch(module: nn.Module) -> int | None:
    """The rows of the current forward pass (the tape's ``batch_rows``), if routed."""
    tape = getattr(module.__dict__.get("forward"), "tape", None)
    return None if tape is None else tape.batch_rows()


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    def forward(self, module: nn.Embedding, input: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # sparse, scale_grad_by_freq and max_norm are refused by check_model
        batch = _micro_batch(module)
        if input.dim() >= 2 and input.shape[0] == 1 and batch not in (None, 1):
            # ids shared by the batch, e.g. position ids (1, T) that the model broadcasts
            # (BERT, GPT-2): as a (B, T) view each sample gets its own output, so G is
            # per-sample; the sum the model broadcasts into is unchanged
            input = input.expand(batch, *input.shape[1:])
        output = F.embedding(input, module.weight.detach(), module.padding_idx)
        return output, {"tokens": input.detach()}

    def norm_sq(self, record: Record) -> torch.Tensor:
        module = record.module
        sample, tokens, g = _flat_tokens(module, record)
        return embedding_norm_sq(sample, tokens, g, record.batch_size, module.num_embeddings)

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        module = record.module
        sample, tokens, g = _flat_tokens(module, record)
        rows = g.float() if scale is None else g.float() * scale[sample].unsqueeze(1)
        buffer_for(grads, module.weight).index_add_(0, tokens, rows)
