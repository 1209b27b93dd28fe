"""nn.MultiheadAttention, made private by swapping in ``DPMultiheadAttention`` at make_private.

``nn.MultiheadAttention`` runs its projections inside one fused function on sequence-first
tensors, so no rule can see its layers. The replacement computes the same function (masks,
``need_weights``, ``batch_first`` either way, dropout on the attention weights, ``bias_k`` /
``bias_v``, ``add_zero_attn``) from modules fastdp has rules for, batch-first inside, and
keeps the original parameter objects, so the optimizer, the parameter names of
``state_dict()`` and any reference the user holds stay valid:

- ``in_proj`` is an nn.Linear holding the original ``in_proj_weight`` / ``in_proj_bias``. It
  is called once per forward (a layer called twice would be refused): on the query for
  self-attention (q, k, v are its three column blocks); for cross-attention on the query,
  key and value concatenated along the tokens, each taking its own column block. The unused
  blocks get zero gradient, so the per-sample gradient is exactly sum over uses.
- ``out_proj`` is the original module (an nn.Linear subclass).
- ``bias_k`` / ``bias_v`` become small modules appending their token (the generic fallback).

Separate key/value sizes (``kdim``/``vdim`` != ``embed_dim``: three weights sharing one bias
vector) are not swapped; ``check_model`` refuses them with the fix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _AppendToken(nn.Module):
    """x (B, S, E) -> (B, S + 1, E) with a learned token appended (``bias_k`` / ``bias_v``)."""

    def __init__(self, token: nn.Parameter) -> None:
        super().__init__()
        self.token = token  # (1, 1, E), the original parameter object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.token.expand(x.shape[0], 1, -1)], dim=1)


class DPMultiheadAttention(nn.Module):
    """Drop-in, exact replacement of an nn.MultiheadAttention (see module docstring)."""

    _qkv_same_embed_dim = True
    merge_masks = nn.MultiheadAttention.merge_masks  # used by TransformerEncoderLayer's fast path

    def __init__(self, original: nn.MultiheadAttention) -> None:
        super().__init__()
        if not original._qkv_same_embed_dim:
            raise ValueError(_KDIM_REFUSAL)
        self.embed_dim = original.embed_dim
        self.kdim, self.vdim = original.kdim, original.vdim
        self.num_heads = original.num_heads
        self.head_dim = original.head_dim
        self.dropout = original.dropout
        self.batch_first = original.batch_first
        self.add_zero_attn = original.add_zero_attn
        weight = original.in_proj_weight
        self.in_proj = nn.Linear(
            self.embed_dim,
            3 * self.embed_dim,
            bias=original.in_proj_bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        self.in_proj.weight = weight
        if original.in_proj_bias is not None:
            self.in_proj.bias = original.in_proj_bias
        self.out_proj = original.out_proj
        self.append_k = _AppendToken(original.bias_k) if original.bias_k is not None else None
        self.append_v = _AppendToken(original.bias_v) if original.bias_v is not None else None
        self.training = original.training
        self.register_state_dict_post_hook(_original_names)
        self.register_load_state_dict_pre_hook(_own_names)

    # the attributes nn.Transformer*'s fast-path checks read
    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    @property
    def bias_k(self) -> torch.Tensor | None:
        return None if self.append_k is None else self.append_k.token

    @property
    def bias_v(self) -> torch.Tensor | None:
        return None if self.append_v is None else self.append_v.token

    def _project(self, query, key, value):
        """(q, k, v), batch-first, from one call of ``in_proj``."""
        e = self.embed_dim
        if key is query and value is query:
            return self.in_proj(query).chunk(3, dim=-1)
        t, s = query.shape[1], key.shape[1]
        if value is key:
            out = self.in_proj(torch.cat([query, key], dim=1))
            return out[:, :t, :e], out[:, t:, e : 2 * e], out[:, t:, 2 * e :]
        out = self.in_proj(torch.cat([query, key, value], dim=1))
        return out[:, :t, :e], out[:, t : t + s, e : 2 * e], out[:, t + s :, 2 * e :]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        batch_axis = 0 if self.batch_first else 1
        if not batched:
            query, key, value = (t.unsqueeze(batch_axis) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # keep identity: _project tells self- from cross-attention
            same_kv = value is key
            same_qk = key is query
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        causal = is_causal and key_padding_mask is None and not need_weights

        q, k, v = self._project(query, key, value)
        if self.append_k is not None:
            k, v = self.append_k(k), self.append_v(v)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        batch, tgt_len, _ = q.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = q.reshape(batch, tgt_len, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            zeros = torch.zeros(batch, heads, 1, head_dim, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        src_len = k.shape[2]
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                mask = attn_mask.view(1, 1, tgt_len, src_len)
            else:
                mask = attn_mask.view(batch, heads, tgt_len, src_len)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, src_len)
            mask = padding if mask is None else mask + padding
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if causal else mask, dropout_p=dropout_p, is_causal=causal
            )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(batch_axis)
        return out, weights


def _pad_last(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


_RENAMES = (
    ("in_proj.weight", "in_proj_weight"),
    ("in_proj.bias", "in_proj_bias"),
    ("append_k.token", "bias_k"),
    ("append_v.token", "bias_v"),
)


def _original_names(module, state_dict, prefix, local_metadata) -> None:
    """state_dict() keys as nn.MultiheadAttention names them (checkpoints stay loadable)."""
    for own, original in _RENAMES:
        if prefix + own in state_dict:
            state_dict[prefix + original] = state_dict.pop(prefix + own)


def _own_names(module, state_dict, prefix, *args) -> None:
    for own, original in _RENAMES:
        if prefix + original in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + original)


_KDIM_REFUSAL = (
    "nn.MultiheadAttention with kdim or vdim different from embed_dim keeps three projection "
    "weights that share one bias vector, which fastdp cannot route through its layer rules: "
    "project keys and values to embed_dim first (kdim = vdim = embed_dim), or freeze the "
    "module with requires_grad_(False)."
)


def replace_modules(model: nn.Module) -> nn.Module:
    """Swap every trainable nn.MultiheadAttention in ``model`` (in place) for an exact
    ``DPMultiheadAttention`` that keeps its parameters; returns ``model``. Modules the swap
    cannot handle are left for ``check_model`` to refuse with the fix."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.MultiheadAttention
                and child._qkv_same_embed_dim
                and any(p.requires_grad for p in child.parameters())
            ):
                setattr(parent, name, DPMultiheadAttention(child))
    return model
