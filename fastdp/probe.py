"""The batch-axis probe: one extra forward pass that proves every layer's leading dimension
is the sample axis, whatever the shapes.

The model's code is trusted (docs/threat_model.md: the adversary chooses samples, not code): a model
written to detect the probe (a patched ``F.dropout``, a counter of its passes) can pass it.

The tape checks in every pass that each handled layer sees the micro-batch size as its
leading dimension. That check cannot tell samples from positions when they happen to have
the same size: a sequence-first layer on (T, B, d), or a positional embedding called on
arange(T) and broadcast over the batch, passes it whenever T == B, and then mixes samples in
one per-"sample" gradient (a sensitivity of several C). So the first training pass of every
input signature is followed by a probe: the same model, under ``torch.no_grad()``, in eval
mode with dropout switched off, and with the RNG state restored afterwards, run three
times: on the batch; on B' samples made of the batch's rows shifted and repeated (row j is
sample (j + 1) mod B), where B' >= 2 differs from the batch size, is not a multiple of it, and
differs from every dimension the layers and inputs showed; and on one sample alone. Checked:
- every handled layer's leading dimension follows B' (else it is not batch-first and is
  refused by name);
- the model's per-sample outputs do not depend on the other samples: each row of the second
  and third passes equals the first pass's row of the same sample. Batch statistics computed
  by plain tensor code (``F.batch_norm(..., training=True)``, ``x - x.mean(0)``, ``x -
  x[:1]``, absmax scaling, in-model mixup) fail this: the shifted, repeated rows change the
  batch, and a sample alone has no batch. Random ops other than dropout (stochastic depth)
  make the passes differ too and are refused by the same check: turn them off.
A loss that mixes samples (a contrastive loss over the batch) is outside the model and
cannot be probed: the loss must be a sum or mean of per-sample terms (README).

A signature (input shapes, small argument values, the modules' train/eval flags) counts as
probed only after a probe that could show mixing: every compared tensor had two different
rows, or was equal across rows in every earlier probe of the signature too (by design). The
probe checks the model on the batches it saw; it is not a proof for every dataset: a model
that mixes samples only on some inputs (or only where a crafted dataset keeps every probed
batch's rows equal) can pass it, which is why mixing code in the model is refused as a bug
of trusted code, not relied on as a defence.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class BatchAxisProbe:
    """Runs the probe for a tape; ``active`` while the probe pass is running."""

    def __init__(self, tape) -> None:
        self.tape = tape
        self.active = False
        self.batch: int | None = None
        self._signatures: set[str] = set()
        # signature -> positions of the compared tensors whose rows were all equal in every
        # probe of it so far (by design, e.g. a position embedding broadcast over the batch)
        self._identical: dict[str, set[int]] = {}
        self._dims: set[int] = set()
        self._seen: list = []  # (args, kwargs, output) of each handled layer in a probe pass
        self._calls: dict[int, int] = {}  # module -> calls in the current probe pass

    def note_shape(self, output: torch.Tensor) -> None:
        """Remember the non-leading dimensions a layer produced in the training pass."""
        self._dims.update(int(d) for d in output.shape[1:])

    def after_forward(self, module: nn.Module, args, kwargs, output) -> None:
        """Forward hook of the root model: probe once per new input signature of a pass
        with autograd on (layers inside reentrant checkpoints ran under no_grad: the probe
        still reaches them, since it runs every layer's rule)."""
        from fastdp.routing import in_backward

        if self.active or in_backward() or not torch.is_grad_enabled():
            return
        dims, self._dims = self._dims, set()
        batch = self.tape.expected_batch
        if batch is None:
            batch = _leading_size((args, kwargs))
        if not batch:
            return
        signature = _signature((args, kwargs), batch)
        if signature is not None:
            signature += _modes(module)
        if signature is not None and signature in self._signatures:
            return
        dims |= _all_dims((args, kwargs))
        probe_batch = next(
            k
            for k in range(2, 2 * batch + len(dims) + 3)
            if k not in dims and k != batch and (batch == 1 or k % batch)
        )
        # every row moves (row j of the probe is sample j + 1 mod B), so no sample keeps its
        # place as "the first" or "the last" of the batch
        index = (torch.arange(probe_batch) + 1) % batch
        probe_args, probe_kwargs = _take((args, kwargs), batch, index)
        lone = torch.tensor([1 % batch])  # one sample alone: nothing to mix with
        lone_args, lone_kwargs = _take((args, kwargs), batch, lone)
        devices = sorted(
            {t.device.index or 0 for t in _tensors((args, kwargs)) if t.device.type == "cuda"}
        )
        saved_expected = self.tape.expected_batch
        self.active = True
        try:
            # training mode, as in the pass being probed (a module may mix samples only in
            # training), with dropout switched off so that the passes can be compared
            # autograd stays on (as in the pass probed; nothing requires grad: the rules
            # detach the parameters), so a model cannot behave differently under no_grad
            with torch.enable_grad(), torch.random.fork_rng(devices=devices), _no_dropout():
                passes = []
                for size, call_args, call_kwargs in (
                    (batch, args, kwargs),
                    (probe_batch, probe_args, probe_kwargs),
                    (1, lone_args, lone_kwargs),
                ):
                    self.batch = self.tape.expected_batch = size
                    self._seen, self._calls = [], {}
                    output = module(*call_args, **call_kwargs)
                    passes.append([output] + self._seen)
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
            self.active, self.batch, self._seen = False, None, []
            self.tape.expected_batch = saved_expected
        # the model's outputs and every handled layer's inputs and output, call by call: a
        # statistic that mixes samples shows in a layer's input even where the output hides
        # it (e.g. a zero weight)
        reference, probed, alone = passes
        _check_rows(reference, probed, batch, index)
        if batch > 1:
            _check_rows(reference, alone, batch, lone)
        if signature is not None and batch > 1 and self._informative(signature, reference, batch):
            self._signatures.add(signature)

    def _informative(self, signature: str, reference: list, batch: int) -> bool:
        """Whether this probe could show mixing wherever the model might mix: every compared
        tensor (model output, layer inputs and outputs) has two different rows, except those
        equal across rows in every earlier probe of the signature too (by design). A batch of
        one sample, of identical rows, or identical where the model mixes (rows that differ
        only in labels, or in values a ReLU zeroes) shows nothing: probe again next time."""
        identical = {
            i
            for i, t in enumerate(_tensors(reference))
            if t.is_floating_point() and t.dim() and t.shape[0] == batch and _rows_equal(t)
        }
        known = self._identical.get(signature)
        self._identical[signature] = identical if known is None else known & identical
        return not identical or (known is not None and identical <= known)

    def run_layer(self, routed, *args, **kwargs):
        """A handled layer's forward during the probe: the rule's forward (what training
        runs), then the check that the leading dimension followed the probe batch."""
        module = routed.module_ref
        calls = self._calls[id(module)] = self._calls.get(id(module), 0) + 1
        if calls > 1:  # a layer reused in one pass: merged at step, or refused by its rule
            try:
                self.tape.note_reuse(routed.name, module, routed.rule)
            except RuntimeError as err:
                raise ProbeRefusal(str(err)) from None
        output, _ = routed.rule.forward(module, *args, **kwargs)
        self._seen.append((args, kwargs, output))
        if output.shape[0] != self.batch:
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


class _no_dropout:
    """Functional dropout (what nn.Dropout and transformers call) and the attention dropout
    of scaled_dot_product_attention switched off: the probe compares passes row by row."""

    _NAMES = (
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
    )

    def __enter__(self):
        functional = torch.nn.functional
        self.saved = {name: getattr(functional, name) for name in self._NAMES}
        self.saved["scaled_dot_product_attention"] = sdpa = functional.scaled_dot_product_attention
        for name in self._NAMES:
            setattr(functional, name, _identity)

        def no_dropout_sdpa(*args, **kwargs):
            kwargs["dropout_p"] = 0.0
            return sdpa(*args, **kwargs)

        functional.scaled_dot_product_attention = no_dropout_sdpa
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.nn.functional, name, fn)
        return False


def _identity(input, *args, **kwargs):
    return input


def _sample_axis(r: torch.Tensor, p: torch.Tensor, batch: int, rows: int) -> int | None:
    """The axis of a compared tensor that holds the samples: size ``batch`` in the reference
    pass and ``rows`` in the other (the first such axis; usually 0, but an output may be
    sequence-first or transposed), the other sizes equal."""
    if not r.is_floating_point() or r.dim() != p.dim():
        return None
    for axis in range(r.dim()):
        if r.shape[axis] == batch and p.shape[axis] == rows:
            others = [d for d in range(r.dim()) if d != axis]
            if all(r.shape[d] == p.shape[d] for d in others):
                return axis
    return None


def _check_rows(reference, probed, batch: int, index: torch.Tensor) -> None:
    """Output row j of the probe pass must equal row index[j] of the reference pass."""
    pairs = []
    for r, p in zip(_tensors(reference), _tensors(probed)):
        axis = _sample_axis(r, p, batch, len(index))
        if axis is not None:
            pairs.append((r.movedim(axis, 0), p.movedim(axis, 0)))
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


def _rows_equal(tensor: torch.Tensor) -> bool:
    rows = tensor.reshape(tensor.shape[0], -1)
    return bool((rows == rows[:1]).all())


def _modes(module: nn.Module) -> str:
    """The train/eval flags of the model's modules: a model may mix samples in one mode only,
    so a probe in eval mode (a validation or adversarial-example forward with autograd on)
    proves nothing about training forwards."""
    return "|modes:" + "".join("1" if m.training else "0" for m in module.modules())


def _leading_size(tree) -> int | None:
    for tensor in _tensors(tree):
        if tensor.dim():
            return int(tensor.shape[0])
    return None


def _all_dims(tree) -> set[int]:
    return {int(d) for t in _tensors(tree) for d in t.shape}


def _signature(tree, batch: int) -> str | None:
    """Shapes with the batch dimension blanked (one probe per sequence length, not per
    Poisson-varying batch size), the values of small tensors without the batch axis and of
    numbers, strings and None (a flag or a 0-dim strength may switch on code that mixes
    samples), and the structure of containers. None when an argument is of another kind,
    whose value the signature cannot capture: such a call is probed every time."""
    parts = []
    for leaf in _leaves(tree):
        if isinstance(leaf, _Mark):
            parts.append(str(leaf))
        elif isinstance(leaf, torch.Tensor):
            shape = tuple(leaf.shape)
            if shape and shape[0] == batch:
                shape = ("B",) + shape[1:]
            elif leaf.numel() <= 16:
                shape = (shape, leaf.detach().cpu().tolist())
            parts.append(f"{shape}:{leaf.dtype}")
        elif leaf is None or isinstance(leaf, (bool, int, float, complex, str)):
            parts.append(repr(leaf))
        elif isinstance(leaf, np.generic):  # numpy scalars (np.bool_ is not a bool)
            parts.append(f"{type(leaf).__name__}({leaf.item()!r})")
        else:
            return None
    return "|".join(parts)


class _Mark(str):
    """Container structure in a signature (not an argument value)."""


def _leaves(tree):
    """Every leaf of nested lists, tuples and dicts, with marks of their structure (type,
    length, dict keys), so that ``f(x)`` and ``f(x, [[]])`` or a keyword and a positional
    string differ."""
    if isinstance(tree, (list, tuple, dict)):
        yield _Mark(f"{type(tree).__name__}[{len(tree)}](")
        if isinstance(tree, dict):
            for key, item in tree.items():
                yield _Mark(f"key {key!r}:")
                yield from _leaves(item)
        else:
            for item in tree:
                yield from _leaves(item)
        yield _Mark(")")
    else:
        yield tree


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
