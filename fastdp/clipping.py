"""Clipping strategies: what happens to per-sample gradients during and after backward.

- ``flat``: c_i = min(1, C / ||g_i||) from the norm over all layers; records are kept until
  the micro-batch is finished (``optimizer.step()``), then every layer runs one clipped GEMM.
- ``automatic``: c_i = C / (||g_i|| + gamma), gamma = 0.01 (normalised per-sample gradients).
- ``per_layer``: layer l is clipped to its own threshold C_l inside backward and dropped.
- ``none``: Noisy-SGD, no norms at all: the model keeps ordinary autograd and the optimizer
  takes ``p.grad`` (fastdp/plain.py); this strategy only carries the mode's facts.

Every strategy drops samples whose gradient is NaN/Inf (their factor is 0 and their rows are
zeroed before the GEMM, since 0 * NaN is NaN) with tensor ops, never a host branch, and
returns how many it dropped as a tensor (read at most once per logical step, on request).

Rounding: the rules return certified squared norms (upper bounds, after rounding, of what
their clipped GEMMs add). The factors are formed in float64 with a relative margin of 2^-20,
which covers the float32 rounding of the factor itself, of the row scaling c_i * G and of
summing the layers' squared norms, so c_i * ||g_i|| <= C holds for the update as computed.

A strategy carries its mode's facts: ``mode``, ``private`` (whether it bounds a sample's
contribution) and ``sensitivity`` (the bound C on the summed gradient's change when one
sample is added or removed; the noise std is sigma * sensitivity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastdp.kernels.rounding import ACCUMULATION_SLACK
from fastdp.rules import Record, rule_for

MODES = ("flat", "per_layer", "automatic", "none")
AUTOMATIC_GAMMA = 0.01
_EPS = 1e-6
_MARGIN = 1.0 + 2.0**-20  # rounding margin of the clip factors (see the module docstring)


def _norms(norm_sq: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """float64 per-sample norms from certified squared norms, inflated by the margin."""
    return norm_sq.double().sqrt() * (grad_scale * _MARGIN)


class ClippingStrategy:
    """Interface. ``on_layer`` runs inside backward, ``finish`` when the micro-batch closes
    (``optimizer.step()``), after every backward pass of it."""

    mode = ""
    private = True
    sensitivity = 0.0

    def on_layer(self, record: Record, tape) -> None:
        raise NotImplementedError

    def finish(self, tape) -> torch.Tensor | None:
        return None

    def tie(self, groups: list) -> None:
        """Weight ties (fastdp/rules/tying.py: TieGroup) whose uses must be clipped together."""
        if groups:
            raise ValueError(
                f"clipping={self.mode!r} cannot clip a tied weight's uses jointly (the "
                "embeddings and head sharing the weight of "
                + ", ".join(f"'{type(g.embeddings[0]).__name__}'" for g in groups)
                + "): use clipping='flat' or 'automatic', or untie the weights."
            )

    def reset(self) -> None:
        """Forget whatever the current backward pass left behind (after an error)."""


class FlatClipping(ClippingStrategy):
    """One threshold on the norm over all layers; clipped GEMMs when the micro-batch closes."""

    mode = "flat"

    def __init__(self, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.sensitivity = max_grad_norm * (1.0 + ACCUMULATION_SLACK)
        self.tied: list = []
        self.records: list[Record] = []
        self.norm_sq: torch.Tensor | None = None

    def tie(self, groups: list) -> None:
        self.tied = [group.pair for group in groups if group.head is not None]

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        return (self.max_grad_norm / (norms + _EPS)).clamp(max=1.0)

    def on_layer(self, record: Record, tape) -> None:
        layer_norm_sq = rule_for(record.module).norm_sq(record).double()
        if self.tied:
            record.extra["norm_sq"] = layer_norm_sq
        self.norm_sq = layer_norm_sq if self.norm_sq is None else self.norm_sq + layer_norm_sq
        self.records.append(record)

    def finish(self, tape) -> torch.Tensor | None:
        records, norm_sq = self.records, self.norm_sq
        self.reset()
        if not records:
            return None
        grad_scale = records[0].grad_scale  # one micro-batch: one batch size
        norm_sq = self._with_ties(records, norm_sq)
        norms = _norms(norm_sq, grad_scale)
        bad = ~torch.isfinite(norms)
        factors = (self.factors(norms.nan_to_num(0.0)) * grad_scale).float()
        scale = torch.where(bad, torch.zeros_like(factors), factors)
        for record in records:
            record.zero_samples(bad)  # no-op values for finite samples; no host branch
            rule_for(record.module).accumulate(record, scale, tape.grads)
        return bad.sum()

    def _with_ties(self, records: list[Record], norm_sq: torch.Tensor) -> torch.Tensor:
        """Replace the two separate norms of each tied pair by their joint certified norm."""
        from fastdp.rules.tying import tied_norm_sq

        by_module = {id(r.module): r for r in records}
        for pair in self.tied:
            emb, head = by_module.get(id(pair.embedding)), by_module.get(id(pair.head))
            if emb is None or head is None:
                continue  # one use did not run in this micro-batch: no cross term
            emb_sq, head_sq = emb.extra["norm_sq"], head.extra["norm_sq"]
            joint = tied_norm_sq(pair, emb, head, emb_sq, head_sq)
            norm_sq = norm_sq - emb_sq - head_sq + joint
        return norm_sq

    def reset(self) -> None:
        self.records, self.norm_sq = [], None


class AutomaticClipping(FlatClipping):
    """Automatic clipping (normalisation): c_i = C / (||g_i|| + gamma)."""

    mode = "automatic"

    def __init__(self, max_grad_norm: float, gamma: float = AUTOMATIC_GAMMA) -> None:
        super().__init__(max_grad_norm)
        self.gamma = gamma

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        return self.max_grad_norm / (norms + self.gamma)


class _InBackward(ClippingStrategy):
    """Strategies that finish each layer inside backward; they only remember which samples
    they dropped (per layer) to report the count at the end of the pass."""

    def __init__(self) -> None:
        self.dropped: torch.Tensor | None = None

    def _note_dropped(self, bad: torch.Tensor) -> None:
        self.dropped = bad if self.dropped is None else self.dropped | bad

    def finish(self, tape) -> torch.Tensor | None:
        dropped = None if self.dropped is None else self.dropped.sum()
        self.dropped = None
        return dropped

    def reset(self) -> None:
        self.dropped = None


class PerLayerClipping(_InBackward):
    """Each layer clipped to its own threshold inside backward; nothing is kept."""

    mode = "per_layer"

    def tie(self, groups: list) -> None:
        """Embeddings sharing a weight are one layer (the tape merges their records); a
        shared weight that is also a head's is refused (two layers, one tensor)."""
        super().tie([group for group in groups if group.head is not None])

    def __init__(self, thresholds: dict[str, float]) -> None:
        super().__init__()
        self.thresholds = thresholds
        total = math.sqrt(sum(c * c for c in thresholds.values()))
        self.sensitivity = total * (1.0 + ACCUMULATION_SLACK)

    def on_layer(self, record: Record, tape) -> None:
        rule = rule_for(record.module)
        norms = _norms(rule.norm_sq(record), record.grad_scale)
        bad = ~torch.isfinite(norms)
        threshold = self.thresholds[record.name]
        scale = (threshold / (norms.nan_to_num(0.0) + _EPS)).clamp(max=1.0) * record.grad_scale
        scale = scale.float()
        scale = torch.where(bad, torch.zeros_like(scale), scale)
        record.zero_samples(bad)  # no-op values for finite samples; no host branch
        rule.accumulate(record, scale, tape.grads)
        self._note_dropped(bad)


class NoClipping(ClippingStrategy):
    """Noisy-SGD: no norms, no clipping. The model is not routed (the optimizer takes the
    ordinary autograd gradients, fastdp/plain.py: AutogradSums); this carries the facts."""

    mode = "none"
    private = False

    def tie(self, groups: list) -> None:
        """No clipping: the uses of a tied weight simply add into its sum."""

    def __init__(self, noise_scale: float = 1.0) -> None:
        self.sensitivity = noise_scale  # no bound: only the noise std is sigma * this

    def on_layer(self, record: Record, tape) -> None:
        raise RuntimeError("clipping='none' takes autograd's gradients: no layer is routed")


def make_strategy(
    clipping: str,
    max_grad_norm: float | Sequence[float],
    layer_names: list[str],
) -> ClippingStrategy:
    """Build the strategy for ``clipping``; validates thresholds (clear errors)."""
    if clipping not in MODES:
        raise ValueError(f"unknown clipping mode {clipping!r}; use one of {', '.join(MODES)}")
    if clipping == "none":
        if max_grad_norm is None:
            max_grad_norm = 1.0
        if not isinstance(max_grad_norm, (int, float)):
            raise ValueError(
                "with clipping='none' max_grad_norm only scales the noise (std = sigma * "
                f"max_grad_norm) and must be a finite number > 0, got {max_grad_norm!r}"
            )
        _check_threshold(max_grad_norm)
        return NoClipping(float(max_grad_norm))
    if max_grad_norm is None:
        raise ValueError(f"clipping={clipping!r} needs a max_grad_norm > 0")
    if clipping == "per_layer":
        if isinstance(max_grad_norm, (int, float)):
            _check_threshold(max_grad_norm)
            each = float(max_grad_norm) / math.sqrt(max(len(layer_names), 1))
            return PerLayerClipping({name: each for name in layer_names})
        thresholds = [float(c) for c in max_grad_norm]
        if len(thresholds) != len(layer_names):
            raise ValueError(
                f"clipping='per_layer' got {len(thresholds)} thresholds for {len(layer_names)} "
                f"layers with trainable parameters ({', '.join(layer_names)}): give one per "
                "layer, in that order, or a single float."
            )
        for c in thresholds:
            _check_threshold(c)
        return PerLayerClipping(dict(zip(layer_names, thresholds)))
    if not isinstance(max_grad_norm, (int, float)):
        raise ValueError(f"clipping={clipping!r} takes one max_grad_norm (a float)")
    _check_threshold(max_grad_norm)
    if clipping == "automatic":
        return AutomaticClipping(float(max_grad_norm))
    return FlatClipping(float(max_grad_norm))


def _check_threshold(c: float) -> None:
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {c!r}")
