"""How a private model's layers reach the tape: each handled layer's forward is replaced by
``_RoutedForward`` (its rule's forward, then a ``_Tap`` whose backward hands the output
gradient to the tape), which layers are handled, and the labels of reentrant activation
checkpoints (their recomputation in backward makes records that must be matched to the
forward pass that built the checkpoint)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fastdp.probe import _tensors
from fastdp.rules import LayerRule, Record

if TYPE_CHECKING:
    from fastdp.tape import Tape


def in_backward() -> bool:
    """Whether autograd is executing a backward pass on this thread right now."""
    return torch._C._current_graph_task_id() != -1


_REPLAY = object()  # the record of a forward replayed by non-reentrant checkpointing


class _Tap(torch.autograd.Function):
    """Identity on the layer output (in place, so later in-place ops such as a residual
    ``out += x`` stay legal); backward reports G to the tape.

    The layer's parameters are inputs so that the output requires grad even when the layer
    input does not (first layer, embeddings); their gradient is reported as None.
    """

    @staticmethod
    def forward(ctx, tape: Tape, record, output: torch.Tensor, *params):
        ctx.tape, ctx.record, ctx.n_params = tape, record, len(params)
        ctx.name = getattr(record, "name", "")
        ctx.params = params
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        passthrough = (None, None, grad_output) + (None,) * ctx.n_params
        if ctx.record is _REPLAY or not _trains_parameters(ctx.params):
            # torch.autograd.grad(loss, inputs) or backward(inputs=...) without these
            # parameters: an input-gradient pass (adversarial examples, penalties), not a
            # training step, so nothing is recorded
            return passthrough
        if ctx.record is None:
            ctx.tape._fail(
                f"a second backward pass went through module '{ctx.name}' on the same graph "
                "(retain_graph=True): each sample would be counted twice in the logical "
                "batch. Run a new forward pass for every backward."
            )
        ctx.tape.on_backward(ctx.record, grad_output)
        ctx.record = None
        return passthrough


def _trains_parameters(params: tuple[torch.Tensor, ...]) -> bool:
    """Whether this backward pass accumulates gradients into any of ``params``."""
    for param in params:
        node = torch.autograd.graph.get_gradient_edge(param).node
        if torch._C._will_engine_execute_node(node):
            return True
    return False


def can_merge(rule) -> bool:
    """Whether ``rule`` combines several calls of one layer (``LayerRule.merge``)."""
    return rule is not None and type(rule).merge is not LayerRule.merge


class _RoutedForward:
    """Instance-level forward of a handled layer: rule forward + tap (or the plain forward
    when autograd is off, e.g. evaluation under torch.no_grad())."""

    def __init__(self, tape: Tape, module: nn.Module, name: str, rule) -> None:
        self.tape, self.name, self.rule = tape, name, rule
        self.module_ref = module
        self.params = [p for p in module.parameters(recurse=False) if p.requires_grad]

    def __call__(self, *args, **kwargs):
        module, tape = self.module_ref, self.tape
        if tape.probe.active:
            return tape.probe.run_layer(self, *args, **kwargs)
        if not torch.is_grad_enabled():
            if tape._in_root_pass and not in_backward():  # e.g. inside a reentrant checkpoint
                tape._no_grad_calls[id(module)] = tape._no_grad_calls.get(id(module), 0) + 1
            return type(module).forward(module, *args, **kwargs)
        if not (tape._in_root_pass or in_backward()):
            raise RuntimeError(
                f"module '{self.name}' ({type(module).__name__}) was called with autograd on "
                "outside the forward of the model made private. fastdp's per-pass checks "
                "(batch axis, buffers, batch-statistics modules) run around that forward: call "
                "the model, not its submodules, in training."
            )
        output, saved = self.rule.forward(module, *args, **kwargs)
        if getattr(self.rule, "may_save_output", False):
            output = output.clone()  # the tap marks its input dirty: keep autograd's copy
        if in_backward() and tape.is_replay(self.name, module):
            # non-reentrant checkpointing recomputes this layer's forward to refill saved
            # tensors: replay the same ops, record nothing (the first forward's record stands)
            return _Tap.apply(tape, _REPLAY, output, *self.params)
        tape.on_forward(self.name, module, output.shape[0], self.rule)
        tape.probe.note_shape(output)
        # a record made in backward (a reentrant checkpoint's recomputation) cannot tell
        # which forward pass it belongs to: no label, so it is never merged with another
        pass_id = None if in_backward() else tape._pass_id
        record = Record(module=module, name=self.name, saved=saved, pass_id=pass_id)
        tape._awaiting_backward[id(module)] = tape._awaiting_backward.get(id(module), 0) + 1
        return _Tap.apply(tape, record, output, *self.params)


def handled_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module owning trainable parameters directly, in model order:
    the layers fastdp routes, and the 'layers' of per_layer clipping."""
    return [
        (name or type(module).__name__, module)
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]


def clipping_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of per_layer clipping: ``handled_layers`` less the modules whose trainable
    parameters an earlier layer holds (embeddings sharing one weight are one layer, T5's
    shared / encoder / decoder embeddings)."""
    seen: set[int] = set()
    layers = []
    for name, module in handled_layers(model):
        own = {id(p) for p in module.parameters(recurse=False) if p.requires_grad}
        if own <= seen:
            continue
        seen |= own
        layers.append((name, module))
    return layers


def tag_checkpoints(tape, output) -> None:
    """Label the reentrant activation checkpoints of this pass: their segments ran with
    autograd off and are recomputed in backward, where the records they make must be
    known to belong to this pass (not to a pass of another micro-batch whose graph is
    backpropagated now). A hook on each checkpoint's autograd node sets the label while
    the node runs and refuses a second run (a retained graph backpropagated twice would
    count its samples twice)."""
    pass_id = tape._pass_id
    seen: dict[int, object] = {}  # keeps the node wrappers alive, so ids are not reused
    stack = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        if "Checkpoint" in type(node).__name__:
            node.register_prehook(_checkpoint_prehook(tape, pass_id))
            node.register_hook(_checkpoint_done(tape))
        stack.extend(child for child, _ in node.next_functions)


def _checkpoint_prehook(tape, pass_id: int):
    runs = [0]

    def prehook(grad_outputs):
        runs[0] += 1
        if runs[0] > 1:
            tape._fail(
                "a reentrant activation checkpoint of one forward pass was backpropagated "
                "twice (retain_graph=True): its layers' samples would count twice. Run a "
                "new forward pass for every backward."
            )
        tape._recompute_pass = pass_id

    return prehook


def _checkpoint_done(tape):
    def done(grad_inputs, grad_outputs) -> None:
        tape._recompute_pass = None

    return done
