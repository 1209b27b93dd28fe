"""The tape: routes handled layers through their rules and collects backward records.

``Tape.attach(model)`` replaces the forward of every layer that has trainable parameters by
its rule's forward (parameters detached, so autograd computes input gradients only) followed
by a ``_Tap``: an identity, in place on the layer output, whose backward hands the output
gradient G to the clipping strategy (both in fastdp/routing.py).

A micro-batch is the unit of clipping: every backward pass that runs between two
``optimizer.step()`` calls belongs to it, and ``finish()`` (called by ``step()``) closes it,
e.g. flat clipping forms the clip factors from the norms of *all* layers and runs the clipped
GEMMs. So a sample's whole gradient is clipped once even when autograd splits the backward
into nested passes (reentrant activation checkpointing runs one per segment). Every gradient
of a micro-batch must come from one forward pass: the rows of two passes are different
samples, and a sample in both would be clipped twice (two views, two forwards summed, two
towers each with its own backward are refused); so is a layer that receives a second
backward of the same pass, and reading the sums (``step``, ``grad_sums``) inside backward.

A layer called several times in one forward pass (T5's shared embedding for encoder and
decoder inputs, a layer shared across depth) is one layer with one per-sample gradient, the
sum over its calls: its records are held until the micro-batch closes and merged by its rule
(``LayerRule.merge``: the calls' positions concatenated per sample), so it is clipped once.
Rules without ``merge`` (conv, the torch.func fallback) refuse a second call.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdp.clipping import ClippingStrategy
from fastdp.guards import BufferGuard
from fastdp.probe import BatchAxisProbe
from fastdp.routing import (
    _RoutedForward,
    can_merge,
    clipping_layers,
    handled_layers,
    in_backward,
    tag_checkpoints,
)
from fastdp.rules import Record, rule_for


class Tape:
    """Owns the per-layer bookkeeping of one private model."""

    def __init__(self, strategy: ClippingStrategy, loss_reduction: str, grads: dict) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.strategy = strategy
        self.loss_reduction = loss_reduction
        self.grads = grads  # param -> float32 sum of clipped per-sample gradients
        self.layers: list[tuple[str, nn.Module]] = []
        # samples dropped for non-finite gradients since the last step: a tensor, never read
        # on the hot path (DPOptimizer.dropped_samples reads it on request)
        self._dropped: torch.Tensor | None = None
        self.invalid_reason: str | None = None
        self.expected_batch: int | None = None  # set by the private loader per micro-batch
        self.views = 1  # augmentation multiplicity K: rows i*K .. i*K+K-1 are sample i
        self.probe = BatchAxisProbe(self)
        self.guard: BufferGuard | None = None
        self._root: nn.Module | None = None
        self._hooks: list = []
        self._pass_calls: dict[int, int] = {}  # module -> calls in the current forward pass
        self._pass_batch: tuple[str, int] | None = None
        self._pass_id = 0  # counts the model's forward passes (labels records)
        self._micro_pass: int | None = None  # the one forward pass this micro-batch's G is of
        # the pass whose reentrant checkpoint is being recomputed in backward (set by a hook
        # on the checkpoint's autograd node, fastdp/tape.py: _tag_checkpoints)
        self._recompute_pass: int | None = None
        self._awaiting_backward: dict[int, int] = {}  # module -> records with no G yet
        self._no_grad_calls: dict[int, int] = {}  # module -> calls with autograd off, this pass
        # module -> pass label of the records that received G in this micro-batch
        self._recorded: dict[int, int | None] = {}
        self.reused: set[int] = set()  # modules seen called more than once in a pass
        # embedding -> (module, name) of the first of its tie group
        self._alias: dict[int, tuple[nn.Module, str]] = {}
        # records of reused (or weight-sharing) layers, merged at step:
        # key -> ((module, name) they are merged into, records)
        self._deferred: dict[int, tuple[tuple[nn.Module, str], list[Record]]] = {}
        self._deferred_modules: set[int] = set()
        self._micro_batch: tuple[str, int] | None = None
        self._open_passes: set[int] = set()  # graph tasks whose end callback is queued
        self._in_root_pass = False  # inside the private model's own forward

    # ---- attaching ----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Route every handled layer of ``model`` through its rule (model checked already)."""
        for display, module in handled_layers(model):
            module.forward = _RoutedForward(self, module, display, rule_for(module))
            self.layers.append((display, module))
        self._root = model
        self.guard = BufferGuard(model)
        self._hooks = [
            model.register_forward_pre_hook(self._start_pass),
            model.register_forward_hook(self._end_pass, with_kwargs=True),
            model.register_forward_hook(self._after_pass, always_call=True),
        ]

    def share(self, groups: list) -> None:
        """Embeddings holding one weight (fastdp/rules/tying.py: TieGroup) are one layer: their
        records are merged into one of the group's first embedding, clipped once."""
        names = {id(module): name for name, module in self.layers}
        for group in groups:
            if len(group.embeddings) > 1:
                owner = group.embeddings[0]
                for embedding in group.embeddings:
                    self._alias[id(embedding)] = (owner, names[id(owner)])

    def detach(self) -> None:
        """Restore the layers' own forwards."""
        for _, module in self.layers:
            if isinstance(module.__dict__.get("forward"), _RoutedForward):
                del module.forward
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.layers.clear()

    # ---- forward --------------------------------------------------------------------------
    def _start_pass(self, module, args) -> None:
        if in_backward() or self.probe.active:
            return  # checkpoint recomputation or the probe: not a new training forward
        self.guard.before()
        self._in_root_pass = True
        if self._open_passes:
            # a backward raised (e.g. in a user hook) before autograd finished it: some
            # layers may have added their share to the logical batch already
            self.reset()
            self.invalid_reason = "a backward pass was interrupted by an exception"
        self._pass_calls.clear()
        self._pass_batch = None
        self._pass_id += 1
        self._recompute_pass = None  # a checkpoint backward that raised leaves it set
        self._awaiting_backward.clear()
        self._no_grad_calls.clear()

    def _end_pass(self, module, args, kwargs, output) -> None:
        if in_backward() or self.probe.active:
            return
        self._in_root_pass = False
        self.guard.after()
        if self._no_grad_calls and torch.is_grad_enabled():
            tag_checkpoints(self, output)
        self.probe.after_forward(module, args, kwargs, output)

    def _after_pass(self, module, args, output) -> None:
        """Runs after every forward of the model, also one that raised: then the pass is
        closed here (else the tape would take later calls of its layers, outside any forward
        of the model, as part of it)."""
        if not self._in_root_pass or in_backward() or self.probe.active:
            return  # closed by _end_pass, or not a training forward
        self._in_root_pass = False
        self._pass_calls.clear()
        self._awaiting_backward.clear()
        self._no_grad_calls.clear()
        try:
            self.guard.after()
        except RuntimeError as err:
            self.invalid_reason = str(err)

    def on_forward(self, name: str, module: nn.Module, batch: int, rule) -> None:
        if self.expected_batch is not None and batch != self.expected_batch:
            raise ValueError(
                f"module '{name}' ({type(module).__name__}) saw a leading dimension of {batch} "
                f"but the micro-batch has {self.expected_batch} samples. fastdp needs every "
                "layer input batch-first: do not flatten the batch with other dimensions "
                "(e.g. (B*T, d)) or feed sequence-first tensors, and call embeddings of "
                "positions on positions.expand(B, T)."
            )
        calls = self._pass_calls.get(id(module), 0)
        if calls:
            self.note_reuse(name, module, rule)
            if id(module) in self._recorded and id(module) not in self._deferred_modules:
                self._fail(
                    f"module '{name}' ({type(module).__name__}) was called again after the "
                    "gradient of its first call was clipped (a layer reused inside a reentrant "
                    "activation checkpoint): its calls must be clipped together. Use "
                    "non-reentrant checkpointing (use_reentrant=False)."
                )
        self._pass_calls[id(module)] = calls + 1
        if self._pass_batch is None:
            self._pass_batch = (name, batch)
        elif self._pass_batch[1] != batch:
            raise _batch_mismatch(self._pass_batch, (name, batch))

    def note_reuse(self, name: str, module: nn.Module, rule) -> None:
        """A second call of ``module`` in one pass: its calls' records will be merged, or,
        when its rule cannot merge them, the model is refused."""
        if not can_merge(rule):
            raise RuntimeError(
                f"module '{name}' ({type(module).__qualname__}) was called twice in one forward "
                "pass. Its per-sample gradient is the sum over its calls, which fastdp combines "
                "before clipping for Linear, HF Conv1D, Embedding and the norm layers, not for "
                "this layer's rule. Use a separate module for each use, or freeze it."
            )
        self.reused.add(id(module))

    def is_replay(self, name: str, module: nn.Module) -> bool:
        """A call in backward: a non-reentrant checkpoint's replay of a recorded call (a record
        awaits its G), or a reentrant checkpoint's recomputation of a call that ran with
        autograd off in the forward (to be recorded now). Both at once cannot be told apart."""
        awaiting = self._awaiting_backward.get(id(module), 0)
        no_grad = self._no_grad_calls.get(id(module), 0)
        if awaiting and no_grad:
            self._fail(
                f"module '{name}' ({type(module).__name__}) was called both with autograd off "
                "(inside a reentrant activation checkpoint or torch.no_grad()) and with autograd "
                "on in one forward pass, and is recomputed in backward: fastdp cannot tell which "
                "call is recomputed. Use non-reentrant checkpointing (use_reentrant=False)."
            )
        if no_grad:
            self._no_grad_calls[id(module)] = no_grad - 1
        return bool(awaiting)

    # ---- backward -------------------------------------------------------------------------
    def on_backward(self, record: Record, grad_output: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task not in self._open_passes:
            # one callback per autograd graph task: nested (reentrant checkpoint) passes get
            # their own; a pass whose callback never runs was interrupted
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self._open_passes.discard(task)
            )
            self._open_passes.add(task)
        module_id = id(record.module)
        waiting = self._awaiting_backward.get(module_id, 0)
        if waiting:
            self._awaiting_backward[module_id] = waiting - 1
        label = self._pass_of(record)
        if module_id in self._recorded and not (
            # several calls of one reused layer in one forward pass: merged at step
            module_id in self._deferred_modules and self._recorded[module_id] == label
        ):
            self._fail(
                f"module '{record.name}' appeared twice in the backward passes of one "
                "micro-batch (several backward passes of one forward through it, e.g. two "
                "losses backpropagated separately, before optimizer.step()): each of its "
                "samples would be clipped and counted once per pass. Sum the losses and call "
                "backward once per micro-batch, then optimizer.step()."
            )
        self._recorded[module_id] = label
        record.grad_output = grad_output
        batch = grad_output.shape[0]
        if batch % self.views:
            self._fail(
                f"module '{record.name}' saw {batch} rows, not a multiple of the augmentation "
                f"multiplicity {self.views}: the private loader yields B samples x K views"
            )
        # a sample's gradient is the mean over its K views: rows sum to (1/K) per sample
        record.group = self.views
        record.grad_scale = batch / self.views if self.loss_reduction == "mean" else 1 / self.views
        if self._micro_batch is None:
            self._micro_batch = (record.name, batch)
        elif self._micro_batch[1] != batch:
            self._fail(str(_batch_mismatch(self._micro_batch, (record.name, batch))))
        owner = self._alias.get(module_id)
        if owner is not None or module_id in self.reused:
            owner = (record.module, record.name) if owner is None else owner
            self._deferred.setdefault(id(owner[0]), (owner, []))[1].append(record)
            self._deferred_modules.add(module_id)
        elif batch:  # an empty (Poisson) micro-batch contributes nothing; noise comes at step
            self._guarded(self.strategy.on_layer, record, self)

    def _pass_of(self, record: Record) -> int:
        """The forward pass ``record`` belongs to; every record of a micro-batch must belong
        to one pass: the rows of two passes are different samples (a sample in each would
        be clipped twice, and merged records of shared layers would mix samples)."""
        label = record.pass_id
        if label is None:  # made in this backward by a reentrant checkpoint's recomputation
            label = self._recompute_pass
            if label is None:
                self._fail(
                    f"module '{record.name}' was called in backward outside a reentrant "
                    "activation checkpoint of the model's own forward (torch.utils.checkpoint) "
                    "that fastdp could match to its forward pass. Call the model's layers in "
                    "its forward, or use non-reentrant checkpointing (use_reentrant=False)."
                )
        if self._micro_pass is None:
            self._micro_pass = label
        elif self._micro_pass != label:
            self._fail(
                f"module '{record.name}' received the gradient of a second forward pass in one "
                "micro-batch (two forward passes with one backward, or several backward passes "
                "before optimizer.step()): the rows of the two passes are different samples, "
                "and a sample in both would be clipped once per pass. Run one forward and one "
                "backward per micro-batch and call optimizer.step() after each."
            )
        return label

    def _guarded(self, call, *args):
        """Run a strategy call; an exception aborts the logical batch (no partial sums)."""
        try:
            return call(*args)
        except Exception as err:
            self._fail(f"{type(err).__name__} in fastdp's backward: {err}")

    def finish(self) -> None:
        """Close the micro-batch: the strategy clips what it kept (flat: all layers of all
        backward passes since the last call) into the logical-batch sums."""
        if in_backward():
            self._fail(
                "optimizer.step() or grad_sums was called during a backward pass (e.g. from a "
                "tensor or module hook): the layers whose gradient had not arrived yet would "
                "be clipped apart from the rest of their samples' gradients. Read them after "
                "backward() returns."
            )
        if self._open_passes:
            self.reset()
            self.invalid_reason = "a backward pass was interrupted by an exception"
        if self.invalid_reason is not None:
            return
        deferred, self._deferred = self._deferred, {}
        self._deferred_modules.clear()
        for owner, records in deferred.values():
            if records[0].grad_output.shape[0]:
                merged = self._guarded(_merge, owner, records)
                self._guarded(self.strategy.on_layer, merged, self)
        dropped = self._guarded(self.strategy.finish, self)
        if dropped is not None:
            self._dropped = dropped if self._dropped is None else self._dropped + dropped

    def close_micro_batch(self) -> None:
        """After ``finish``, at ``optimizer.step()``: the next backward pass belongs to a new
        micro-batch (until then a second backward through a layer is refused, also after
        ``finish`` ran early because ``grad_sums`` was read)."""
        self._recorded.clear()
        self._deferred.clear()
        self._deferred_modules.clear()
        self._micro_batch = None
        self._micro_pass = None
        self._recompute_pass = None

    def _fail(self, message: str) -> None:
        """Abort this backward pass: the logical batch is invalid until discarded."""
        self.reset()
        self.invalid_reason = message
        raise RuntimeError(message)

    def reset(self) -> None:
        """Forget the current micro-batch (the autograd engine drops its callbacks when
        backward raises) and anything the strategy kept from it."""
        self.strategy.reset()
        self._open_passes.clear()
        self._recorded.clear()
        self._deferred.clear()
        self._deferred_modules.clear()
        self._awaiting_backward.clear()
        self._micro_batch = None
        self._micro_pass = None
        self._recompute_pass = None
        self.invalid_reason = None
        self._dropped = None

    # ---- the logical step's view of the sums ------------------------------------------------
    def logical_sums(self, params: list) -> tuple[dict, float]:
        """({p: float32 sum}, 1.0): the float64 clipped sums of the logical batch, converted
        for the update (zeros for a parameter no sample reached, e.g. an empty batch)."""
        for p in params:
            if p not in self.grads:
                self.grads[p] = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        return {p: self.grads[p].float() for p in params}, 1.0

    def drop_non_finite(self) -> bool:
        """Non-finite samples were dropped in backward: a non-finite clipped sum overflowed
        and cannot be repaired (False: the step refuses)."""
        return False

    def clear(self) -> None:
        """Zero the accumulators after the update (one multi-tensor op)."""
        if self.grads:
            torch._foreach_zero_(list(self.grads.values()))

    def take_dropped(self) -> torch.Tensor | None:
        """Samples dropped in the logical batch that just closed (a tensor)."""
        dropped, self._dropped = self._dropped, None
        return dropped

    def batch_rows(self) -> int | None:
        """Rows of the current forward pass: the private loader's micro-batch size, else the
        leading dimension the pass's first handled layer saw (None before any)."""
        if self.expected_batch is not None:
            return self.expected_batch
        return None if self._pass_batch is None else self._pass_batch[1]

    def pending(self) -> bool:
        """Whether backward passes of an unfinished micro-batch were recorded."""
        return bool(self._recorded)

    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]


def _batch_mismatch(first: tuple[str, int], other: tuple[str, int]) -> ValueError:
    return ValueError(
        f"module '{other[0]}' saw a batch dimension of {other[1]} while '{first[0]}' saw "
        f"{first[1]} in the same pass. A layer whose parameter is used without the batch "
        "dimension (e.g. a positional embedding called on arange(T) and broadcast over the "
        "batch) has no per-sample gradient: call it on a batch-first input, e.g. "
        "positions.expand(B, T)."
    )


def _merge(owner: tuple[nn.Module, str], records: list[Record]) -> Record:
    """One record of ``owner`` for all calls of a reused layer, or of the layers sharing its
    weight (every call's G has arrived or never will: a call whose output did not reach the
    loss adds nothing)."""
    first = records[0]
    merged = first if len(records) == 1 else rule_for(owner[0]).merge(records)
    merged.module, merged.name = owner
    merged.grad_scale, merged.group, merged.pass_id = first.grad_scale, first.group, first.pass_id
    return merged


__all__ = ["Tape", "can_merge", "clipping_layers", "handled_layers", "in_backward"]
