"""Weight tying between an Embedding and a Linear head (GPT-2's wte / lm_head).

The tied matrix W (V x d) gets two per-sample contributions: the embedding's
e_i = sum_t onehot(x_t) g_t^T (g_t: the gradient at embedding position t) and the head's
h_i = G_i^T A_i (G: the head's output gradient, T_h x V; A: its input, T_h x d). Sample i's
gradient of W is their sum, so its squared norm has a cross term:

    ||e + h||^2 = ||e||^2 + ||h||^2 + 2 c,   c = <e, h> = sum_t sum_s G[s, x_t] (g_t . a_s),

the head's output gradient read at the input tokens times the dot products of the
embedding's gradients with the head's inputs: one gather of G at the token ids and a
(T_h x T_e) product per sample, the cost of a ghost norm, nothing of size V x d per sample.
Both uses are then added with the one clip factor c_i (flat and automatic clipping; per-layer
clipping would clip the two uses separately and is refused).

Rounding: c is computed in float64; |c_hat - c| <= gamma64_{d + T_h T_e + 2} sum_ts
|G[s, x_t]| (||a_s|| ||g_t|| + |P_st|) with P = A g^T as computed. The rules' certified values
R_e^2 >= (||e|| + delta_e)^2 and R_h^2 >= (||h|| + delta_h)^2 (delta: what their GEMMs may add
by rounding) bound ||e||^2 + ||h||^2, so what the two GEMMs add for the sample has norm at most
sqrt(R_e^2 + R_h^2 + 2 c_up) + delta_e + delta_h, with delta_e <= (u32 + gamma64) sum_t ||g_t||
(fastdp/rules/embedding.py) and delta_h <= rho S plus the head GEMM's accumulation excess
(kernels/rounding.py: accumulation_excess)
and delta_h <= rho S (kernels/certified_norm.py: clipped_gemm_rounding, S = sum ||a_s|| ||G_s||).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdp.kernels.certified_norm import U32, U64, gamma, row_norms
from fastdp.kernels.clipped_bound import clipped_gemm_rounding
from fastdp.kernels.rounding import accumulation_excess
from fastdp.rules.base import Record


@dataclass(frozen=True)
class TiedPair:
    """An Embedding and a Linear head that share one weight matrix."""

    embedding: nn.Embedding
    head: nn.Linear


@dataclass(frozen=True)
class TieGroup:
    """Modules sharing one weight: nn.Embedding modules (T5's shared, encoder and decoder
    embeddings are three modules holding one matrix) and at most one nn.Linear head. The
    embeddings' calls are merged into one record of ``embeddings[0]`` (their ids side by side,
    as for one embedding called several times); the head adds the cross term above."""

    embeddings: tuple[nn.Embedding, ...]
    head: nn.Linear | None

    @property
    def pair(self) -> TiedPair | None:
        return None if self.head is None else TiedPair(self.embeddings[0], self.head)


def check_tying(owners: dict[int, list[tuple[str, nn.Module, str]]]) -> list[TieGroup]:
    """The supported groups of modules sharing a parameter; refuse the rest."""
    groups = []
    for users in owners.values():
        if len(users) < 2:
            continue
        names = ", ".join(f"'{name}.{pname}'" for name, _, pname in users)
        modules = [m for _, m, _ in users]
        embeddings = [m for m in modules if type(m) is nn.Embedding]
        heads = [m for m in modules if type(m) is nn.Linear]
        if (
            embeddings
            and len(heads) <= 1
            and len(embeddings) + len(heads) == len(users)
            and all(pname == "weight" for _, _, pname in users)
            and len({m.padding_idx for m in embeddings}) == 1
        ):
            groups.append(TieGroup(tuple(embeddings), heads[0] if heads else None))
            continue
        raise ValueError(
            f"parameters {names} are one tensor (weight tying). fastdp combines the per-sample "
            "gradients of a tied weight only for nn.Embedding modules (with one padding_idx) "
            "and at most one nn.Linear head (GPT-2's wte / lm_head, T5's shared embeddings); "
            "untie these (transformers: tie_word_embeddings=False) or freeze them."
        )
    return groups


def tied_norm_sq(
    pair: TiedPair, emb: Record, head: Record, emb_sq: torch.Tensor, head_sq: torch.Tensor
) -> torch.Tensor:
    """(B,) float64 certified squared norm of the pair's joint contribution (both rules'
    parameters), from the rules' certified values ``emb_sq`` and ``head_sq``."""
    from fastdp.rules.base import group_tokens
    from fastdp.rules.linear import record_operands

    tokens = emb.saved["tokens"]
    rows = tokens.shape[0]
    tokens = tokens.reshape(rows, -1)
    g = emb.grad_output.reshape(rows, tokens.shape[1], -1).double()
    # a sample's K views (augmentation multiplicity) as K*T positions of that sample
    tokens, g = group_tokens(tokens, emb.group), group_tokens(g, emb.group)
    batch = tokens.shape[0]
    if pair.embedding.padding_idx is not None:
        g = g * (tokens != pair.embedding.padding_idx).unsqueeze(-1)
    a, grad_head = record_operands(head)
    index = tokens.unsqueeze(1).expand(batch, grad_head.shape[1], tokens.shape[1])
    gathered = torch.gather(grad_head, 2, index).double()  # G[s, x_t]: (B, T_h, T_e)
    products = torch.bmm(a.double(), g.transpose(1, 2))  # a_s . g_t
    cross = (gathered * products).sum((1, 2))
    norms_a, norms_g = row_norms(a), row_norms(g)
    terms = gathered.abs() * (norms_a.unsqueeze(2) * norms_g.unsqueeze(1) + products.abs())
    n_terms = a.shape[2] + products.shape[1] * products.shape[2] + 2
    cross_up = cross + gamma(n_terms, U64) * terms.sum((1, 2))
    delta_e = (U32 + gamma(g.shape[1] + g.shape[2] + 16, U64)) * norms_g.sum(1)
    rho = clipped_gemm_rounding(a, grad_head)
    s_head = (norms_a * row_norms(grad_head)).sum(1)
    delta_h = rho * s_head
    root_h = head_sq.double().sqrt()
    delta_h = delta_h + accumulation_excess(
        root_h, s_head, a.shape[1], U32 if not a.is_cuda else 2.0**-23
    )
    inner = (emb_sq.double() + head_sq.double() + 2 * cross_up).clamp(min=0)
    bound = (inner.sqrt() + delta_e + delta_h).square()
    return bound * (1.0 + 8 * gamma(n_terms + 16, U64))
