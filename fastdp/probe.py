"""The batch-axis probe: one extra forward pass that proves every layer's leading dimension
is the sample axis, whatever the shapes.

The tape checks in every pass that each handled layer sees the micro-batch size as its
leading dimension. That check cannot tell samples from positions when they happen to have
the same size: a sequence-first layer on (T, B, d), or a positional embedding called on
arange(T) and broadcast over the batch, passes it whenever T == B, and then mixes samples in
one per-"sample" gradient (a sensitivity of several C). So the first training pass of every
input signature is followed by a probe: the same model, under ``torch.no_grad()``, in eval
mode (no dropout) and with the RNG state restored afterwards, run twice: on the batch, and
on B' samples made of the batch's rows repeated (index j -> j mod B), where B' >= 2 differs
from the batch size, is not a multiple of it, and differs from every dimension the layers
and inputs showed. Two things are checked:
- every handled layer's leading dimension follows B' (else it is not batch-first and is
  refused by name);
- the model's per-sample outputs do not depend on the other samples: output row j of the
  second pass equals output row j mod B of the first. Batch statistics computed by plain
  tensor code (``F.batch_norm(..., training=True)``, ``x - x.mean(0)``, in-model mixup) fail
  this, since the repeated rows change every batch statistic.
A loss that mixes samples (a contrastive loss over the batch) is outside the model and
cannot be probed: the loss must be a sum or mean of per-sample terms (README).
"""

from __future__ import annotations

import torch
from torch import nn


class BatchAxisProbe:
    """Runs the probe for a tape; ``active`` while the probe pass is running."""

    def __init__(self, tape) -> None:
        self.tape = tape
        self.active = False
        self.batch: int | None = None
        self._signatures: set[str] = set()
        self._dims: set[int] = set()

    def note_shape(self, output: torch.Tensor) -> None:
        """Remember the non-leading dimensions a layer produced in the training pass."""
        self._dims.update(int(d) for d in output.shape[1:])

    def after_forward(self, module: nn.Module, args, kwargs, output) -> None:
        """Forward hook of the root model: probe once per new input signature of a pass
        with autograd on (layers inside reentrant checkpoints ran under no_grad: the probe
        still reaches them, since it runs every layer's rule)."""
        from fastdp.tape import in_backward

        if self.active or in_backward() or not torch.is_grad_enabled():
            return
        dims, self._dims = self._dims, set()
        batch = self.tape.expected_batch
        if batch is None:
            batch = _leading_size((args, kwargs))
        if not batch:
            return
        signature = _signature((args, kwargs), batch)
        if signature in self._signatures:
            return
        dims |= _all_dims((args, kwargs))
        probe_batch = next(
            k
            for k in range(2, 2 * batch + len(dims) + 3)
            if k not in dims and k != batch and (batch == 1 or k % batch)
        )
        index = torch.arange(probe_batch) % batch
        probe_args, probe_kwargs = _take((args, kwargs), batch, index)
        devices = sorted(
            {t.device.index or 0 for t in _tensors((args, kwargs)) if t.device.type == "cuda"}
        )
        modes = [(m, m.training) for m in module.modules()]
        saved_expected = self.tape.expected_batch
        self.active = True
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                module.eval()
                self.batch = batch
                self.tape.expected_batch = batch
                reference = module(*args, **kwargs)
                self.batch = probe_batch
                self.tape.expected_batch = probe_batch
                probed = module(*probe_args, **probe_kwargs)
        except ProbeRefusal:
            raise
        except Exception as err:
            raise ValueError(
                f"fastdp's batch-axis probe (a forward pass on {probe_batch} samples, the "
                f"rows of the batch of {batch} repeated) failed: {type(err).__name__}: {err}. "
                "fastdp needs the model's tensor inputs batch-first; an input whose first "
                "dimension equals the batch size but is not the batch (e.g. a (T, T) mask "
                "with T == B) confuses it: give such inputs a leading batch dimension."
            ) from err
        finally:
            for m, training in modes:
                m.training = training
            self.active, self.batch = False, None
            self.tape.expected_batch = saved_expected
        _check_rows(reference, probed, batch, index)
        self._signatures.add(signature)

    def run_layer(self, routed, *args, **kwargs):
        """A handled layer's forward during the probe: the rule's forward (what training
        runs), then the check that the leading dimension followed the probe batch."""
        output, _ = routed.rule.forward(routed.module_ref, *args, **kwargs)
        if output.shape[0] != self.batch:
            module = routed.module_ref
            raise ProbeRefusal(
                f"module '{routed.name}' ({type(module).__name__}) is not batch-first: on a "
                f"probe batch of {self.batch} samples its output has leading dimension "
                f"{output.shape[0]} (shape {tuple(output.shape)}). Its per-sample gradients "
                "would mix samples. Feed it batch-first tensors (batch_first=True, "
                "x.transpose(0, 1)), and call positional embeddings on positions.expand(B, T) "
                "rather than arange(T)."
            )
        return output


class ProbeRefusal(ValueError):
    """A layer failed the batch-axis probe."""


def _check_rows(reference, probed, batch: int, index: torch.Tensor) -> None:
    """Output row j of the probe pass must equal row index[j] of the reference pass."""
    pairs = [
        (r, p)
        for r, p in zip(_tensors(reference), _tensors(probed))
        if r.is_floating_point() and r.dim() and r.shape[0] == batch and p.shape[0] == len(index)
    ]
    for r, p in pairs:
        expected = r.index_select(0, index.to(r.device)).double().reshape(len(index), -1)
        got = p.double().reshape(len(index), -1)
        scale = expected.abs().amax(1).clamp(min=1e-30)
        err = (got - expected).abs().amax(1)
        finite = torch.isfinite(expected).all(1) & torch.isfinite(got).all(1)
        bad = finite & (err > 1e-3 * scale + 1e-6)
        if bool(bad.any()):
            raise ProbeRefusal(
                "the model's output for one sample depends on the other samples of the batch "
                f"(output row {int(bad.nonzero()[0])} changed by {float(err[bad].max()):.3g} "
                "when other rows were repeated): batch statistics computed in the forward "
                "(F.batch_norm with training=True, x - x.mean(0), mixup inside the model) mix "
                "samples, so per-sample clipping bounds nothing. Compute such statistics per "
                "sample (GroupNorm / LayerNorm), or outside the private model."
            )


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _leading_size(tree) -> int | None:
    for tensor in _tensors(tree):
        if tensor.dim():
            return int(tensor.shape[0])
    return None


def _all_dims(tree) -> set[int]:
    return {int(d) for t in _tensors(tree) for d in t.shape}


def _signature(tree, batch: int) -> str:
    """Shapes with the batch dimension blanked: one probe per sequence length, not per
    (Poisson-varying) batch size."""
    parts = []
    for t in _tensors(tree):
        shape = tuple(t.shape)
        if shape and shape[0] == batch:
            shape = ("B",) + shape[1:]
        parts.append(f"{shape}:{t.dtype}")
    return "|".join(parts)


def _take(tree, batch: int, index: torch.Tensor):
    if isinstance(tree, torch.Tensor):
        if tree.dim() and tree.shape[0] == batch:
            return tree.index_select(0, index.to(tree.device))
        return tree
    if isinstance(tree, tuple):
        return tuple(_take(item, batch, index) for item in tree)
    if isinstance(tree, list):
        return [_take(item, batch, index) for item in tree]
    if isinstance(tree, dict):
        return {k: _take(v, batch, index) for k, v in tree.items()}
    return tree
