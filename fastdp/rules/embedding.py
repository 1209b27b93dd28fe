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
    merged_record,
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
    if module.padding_idx is not None:  # zero rows, not a data-dependent selection (no sync)
        keep = (tokens != module.padding_idx).unsqueeze(1)
        g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return sample, tokens, g


def _collapse(sample: torch.Tensor, tokens: torch.Tensor, g: torch.Tensor, n_rows: int):
    """(keys, float64 rows): the rows of every distinct (sample, token), summed in float64 (any
    order: error <= gamma64_T sum_t ||g_t||), key = sample * n_rows + token.

    Shapes never depend on the data (no ``unique``, which is a host sync): the n positions
    are sorted by key, each run of equal keys is one segment, and the result has n rows, the
    first (number of distinct keys) of them the segments, the rest zero rows of key 0."""
    keys = sample * n_rows + tokens
    n = keys.shape[0]
    sorted_keys, order = torch.sort(keys)
    starts = torch.ones(n, dtype=torch.int64, device=keys.device)
    starts[1:] = (sorted_keys[1:] != sorted_keys[:-1]).to(torch.int64)
    segment_sorted = torch.cumsum(starts, 0) - 1
    segment = torch.empty_like(segment_sorted).scatter_(0, order, segment_sorted)
    segment_keys = torch.zeros_like(keys).scatter_(0, segment_sorted, sorted_keys)
    summed = torch.zeros(n, g.shape[1], dtype=torch.float64, device=g.device)
    summed.index_add_(0, segment, g.double())
    return segment_keys, summed


def embedding_norm_sq(
    sample: torch.Tensor, tokens: torch.Tensor, g: torch.Tensor, batch: int, n_rows: int
) -> torch.Tensor:
    """(B,) float32 certified squared norms, rounded up, of what ``accumulate`` adds per unit
    of clip factor.

    ``accumulate`` sums each sample's rows of one token in float64 (``_collapse``), scales by c
    and rounds to float32 once (u32), then adds one row per (sample, token) into the float32
    buffer (a single term of the sample per entry: nothing of its own to cancel, covered by
    the strategies' (1 + kappa) sensitivity). So, with M = sum_t ||g_t||, sqrt(N_added) <=
    ||rows64|| (1 + gamma64)(1 + u32) + gamma64_T M: a crafted sample's cancelling positions
    are summed in float64, never in the float32 buffer.
    """
    norms = torch.zeros(batch, dtype=torch.float64, device=g.device)
    if tokens.numel() == 0:
        return norms.float()
    unique_keys, summed = _collapse(sample, tokens, g, n_rows)
    norms.index_add_(0, unique_keys // n_rows, summed.square().sum(1))
    mags = torch.zeros_like(norms).index_add_(
        0, sample, torch.linalg.vector_norm(g, dim=1, dtype=torch.float64)
    )
    n_all = sample.shape[0] + g.shape[1] + 16
    relative = (1 + 4 * gamma(n_all, U64)) * (1 + U32)
    bound = (norms.sqrt() * relative + gamma(n_all, U64) * mags).square()
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

    def merge(self, records: list[Record]) -> Record:
        """Calls on several id tensors (T5's shared embedding: encoder and decoder inputs):
        one sample's ids and G of all calls side by side, so equal ids of different calls
        collapse into one row like equal ids of one call."""
        tokens = torch.cat(
            [r.saved["tokens"].reshape(r.saved["tokens"].shape[0], -1) for r in records], 1
        )
        g = torch.cat(
            [
                r.grad_output.reshape(r.grad_output.shape[0], -1, r.grad_output.shape[-1])
                for r in records
            ],
            1,
        )
        return merged_record(records, "tokens", tokens, g)

    def norm_sq(self, record: Record) -> torch.Tensor:
        module = record.module
        sample, tokens, g = _flat_tokens(module, record)
        return embedding_norm_sq(sample, tokens, g, record.batch_size, module.num_embeddings)

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        module = record.module
        sample, tokens, g = _flat_tokens(module, record)
        if tokens.numel() == 0:
            return
        n_rows = module.num_embeddings
        unique_keys, summed = _collapse(sample, tokens, g, n_rows)
        if scale is not None:
            summed = summed * scale.double()[unique_keys // n_rows].unsqueeze(1)
        buffer = buffer_for(grads, module.weight)
        buffer.index_add_(0, unique_keys % n_rows, summed.to(buffer.dtype))
