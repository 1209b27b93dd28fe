"""Noisy-SGD's gradient source: the ordinary autograd gradients, no per-layer work.

Noisy-SGD (``clipping="none"``) needs no per-sample quantity: the update is
(sum_i grad l_i + sigma C xi) / B. So the model is left as it is (no routed layers, no tape,
no probe), autograd computes ``p.grad`` as in non-private training, and ``finish()`` (at
``optimizer.step()``, once per micro-batch) folds it into the logical batch's sum:

- one micro-batch per logical batch (the common case): ``p.grad`` itself is the sum, scaled
  by the micro-batch's rows under a mean loss (the scale is folded into the fused update's
  ``scale`` and the noise std, so nothing is copied);
- several: ``sum += rows * p.grad`` per micro-batch with multi-tensor ops, in the gradients'
  own dtype (float32: Noisy-SGD carries no sensitivity bound that a rounding chain could
  break, unlike the clipped sums of fastdp/tape.py, which are float64).

A non-finite gradient cannot be traced to its sample without per-sample work, so a micro-batch
whose gradient has a NaN/Inf is dropped whole (``torch.where``, no host sync); the count of
dropped rows is a tensor read only on request (``DPOptimizer.dropped_samples``). Noisy-SGD is a
research tool with no privacy guarantee (its epsilon is infinite), so the batch-axis probe and
the buffer guard, which protect clipping, do not run.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdp.routing import handled_layers


class AutogradSums:
    """Collects ``p.grad`` of the trainable parameters into the logical batch's sum."""

    def __init__(self, loss_reduction: str, params: list[nn.Parameter]) -> None:
        self.loss_reduction = loss_reduction
        self.params = params
        self.layers: list[tuple[str, nn.Module]] = []
        self.expected_batch: int | None = None  # set by the private loader per micro-batch
        self.views = 1
        self.invalid_reason: str | None = None
        self._rows: int | None = None  # leading dimension of the last forward's input
        # the first micro-batch's (grads, scale, rows), kept as they are until a second comes
        self._single: tuple[list[torch.Tensor], float, int] | None = None
        self._sums: list[torch.Tensor] | None = None  # accumulated over >= 2 micro-batches
        self._dropped: torch.Tensor | None = None  # rows dropped (non-finite), as a tensor
        self._hooks: list = []

    # ---- the tape's interface, as the optimizer and engine use it --------------------------
    def attach(self, model: nn.Module) -> None:
        self.layers = handled_layers(model)
        self._hooks = [model.register_forward_pre_hook(self._note_rows, with_kwargs=True)]

    def share(self, groups: list) -> None:
        """Tied weights: autograd sums their uses into one ``p.grad`` already."""

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _note_rows(self, module, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim():
                self._rows = value.shape[0]
                return

    def pending(self) -> bool:
        return self._single is not None or self._sums is not None

    def reset(self) -> None:
        self._single = self._sums = self._dropped = None
        self.invalid_reason = None

    def close_micro_batch(self) -> None:
        pass

    @property
    def grads(self) -> dict[nn.Parameter, torch.Tensor]:
        """The logical batch's sum so far (read as ``DPOptimizer.grad_sums``)."""
        if not self.pending():
            return {}
        sums, factor = self.logical_sums(self._trained())
        return {p: g * factor for p, g in sums.items()}

    def _trained(self) -> list[nn.Parameter]:
        return [p for p in self.params if p.requires_grad]

    # ---- the stage -------------------------------------------------------------------------
    def finish(self) -> None:
        """Fold this micro-batch's ``p.grad`` into the logical batch (consumes ``p.grad``)."""
        params = self._trained()
        if not any(p.grad is not None for p in params):
            return
        rows = self.expected_batch if self.expected_batch is not None else self._rows
        if not rows:  # an empty (Poisson) micro-batch adds nothing; its noise comes at step
            for p in params:
                p.grad = None
            return
        scale = rows / self.views if self.loss_reduction == "mean" else 1.0 / self.views
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        if self._single is None and self._sums is None:
            self._single = (grads, scale, rows)
            return
        if self._sums is None:
            first, first_scale, first_rows = self._single
            self._single = None
            self._sums = self._masked(first, first_scale, first_rows)
        torch._foreach_add_(self._sums, self._masked(grads, scale, rows))

    def _masked(self, grads: list[torch.Tensor], scale: float, rows: int) -> list[torch.Tensor]:
        """``scale * grads``, or zeros where any of them is not finite (the micro-batch is
        dropped; its rows are counted)."""
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        self._count_dropped(finite, rows)
        zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        return torch._foreach_mul([torch.where(finite, g, zero) for g in grads], scale)

    def _count_dropped(self, finite: torch.Tensor, rows: int) -> None:
        lost = (~finite).to(torch.int64) * (rows // self.views)
        self._dropped = lost if self._dropped is None else self._dropped + lost

    def logical_sums(self, params: list[nn.Parameter]) -> tuple[dict, float]:
        """({p: tensor}, factor): the logical batch's sum of p is ``factor * tensor`` (zeros
        for an empty logical batch, which still gets its noise)."""
        if self._single is not None:
            grads, factor, _ = self._single
        elif self._sums is not None:
            grads, factor = self._sums, 1.0
        else:
            return {p: torch.zeros_like(p) for p in params}, 1.0
        return dict(zip(self._trained(), grads)), factor

    def drop_non_finite(self) -> bool:
        """The logical sum is not finite: a lone micro-batch is dropped whole (True); a sum
        of masked micro-batches that is not finite overflowed (False: the step refuses)."""
        if self._single is None:
            return False
        self._count_dropped(torch.zeros((), dtype=torch.bool), self._single[2])
        self._single = None
        return True

    def take_dropped(self) -> torch.Tensor | None:
        """Rows dropped in the logical batch that just closed (a tensor; reading it syncs)."""
        dropped, self._dropped = self._dropped, None
        return dropped

    def clear(self) -> None:
        self._single = self._sums = None


__all__ = ["AutogradSums"]
