"""Per-layer rules: how one layer family computes its per-sample norms and clipped gradients.

A rule runs the layer's forward with detached parameters (so autograd never computes the
ordinary weight gradient: that GEMM is replaced by the clipped one, not added to) and saves
what its per-sample gradients need. In backward the tape hands the rule the output gradient
G; the rule then answers two questions:

- ``norm_sq(record)``: every sample's squared gradient norm over this layer's trainable
  parameters, shape (B,), float32;
- ``accumulate(record, scale, grads)``: grads[p] += sum_i scale_i * (per-sample gradient of p),
  into float64 buffers, one GEMM per parameter with the scale folded in (``scale`` None: the
  plain sum).

Rules see G as autograd delivers it; the loss-reduction factor (B for a mean) is applied by
the clipping strategy, so a rule never spends a pass over G on it.

Rules register themselves with ``@register_rule(nn.Linear)``; ``rule_for(module)`` looks one up
by exact type first, then by the first registered base class, and otherwise answers with the
generic torch.func fallback (fastdp/rules/generic.py) for any module owning trainable
parameters that it can handle.
"""

from __future__ import annotations

from fastdp.rules import (  # noqa: F401,E402  (registration)
    conv,
    conv_nd,
    dora,
    embedding,
    generic,
    hf,
    linear,
    norm,
)
from fastdp.rules.base import (
    LayerRule,
    Record,
    is_fallback,
    register_rule,
    registered_types,
    rule_for,
)

__all__ = ["LayerRule", "Record", "is_fallback", "register_rule", "registered_types", "rule_for"]
