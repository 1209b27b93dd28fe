"""The rule interface, the per-call record and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_REGISTRY: dict[type[nn.Module], LayerRule] = {}
# rules for classes of optional libraries, by qualified name (no import needed to register)
_BY_NAME: dict[str, LayerRule] = {}
_FALLBACK: list[LayerRule] = []  # the generic torch.func rule (fastdp/rules/generic.py)


@dataclass
class Record:
    """What one call of a handled layer leaves for its per-sample gradients.

    ``saved`` holds batch-first tensors from the forward (activations, normalised inputs,
    token ids); ``grad_output`` is G, the gradient of the loss with respect to the layer's
    output, batch-first. Rules work on G as it is; ``grad_scale`` (the physical batch size
    under a mean-reduced loss, 1 under a sum) turns their results into per-sample gradients
    and is applied by the clipping strategy.

    ``group`` K > 1 (augmentation multiplicity): the batch axis holds B samples x K views,
    grouped by sample (view k of sample i at row i*K + k), and a *sample* is the group. Rules
    return (B,) norms of the sum over a sample's K views and take (B,) scales; the helpers
    ``group_tokens``, ``sum_views`` and ``rows_scale`` below do the regrouping.
    """

    module: nn.Module
    name: str
    saved: dict[str, torch.Tensor]
    grad_output: torch.Tensor | None = None
    grad_scale: float = 1.0
    extra: dict = field(default_factory=dict)
    group: int = 1
    pass_id: int | None = None  # the forward pass that made it (None: made in backward)

    @property
    def batch_size(self) -> int:
        """B, the number of samples (rows / group)."""
        return self.grad_output.shape[0] // self.group

    def per_sample_finite(self) -> torch.Tensor:
        """(B,) bool: True where every saved float tensor and G are finite for that sample
        (all K views of it)."""
        ok = torch.isfinite(self.grad_output).flatten(1).all(1)
        for tensor in self.saved.values():
            if tensor.is_floating_point():
                ok &= torch.isfinite(tensor).flatten(1).all(1)
        return ok.view(-1, self.group).all(1)

    def zero_samples(self, drop: torch.Tensor) -> None:
        """Replace the saved tensors and G of the samples in ``drop`` (B,) bool by zeros
        (every view of a dropped sample)."""
        keep = ~drop.repeat_interleave(self.group) if self.group > 1 else ~drop

        def masked(t: torch.Tensor) -> torch.Tensor:
            shape = (-1,) + (1,) * (t.dim() - 1)
            return torch.where(keep.view(shape), t, torch.zeros((), dtype=t.dtype, device=t.device))

        self.grad_output = masked(self.grad_output)
        self.saved = {k: masked(t) if t.is_floating_point() else t for k, t in self.saved.items()}


def group_tokens(tensor: torch.Tensor, group: int) -> torch.Tensor:
    """(B*K, T, ...) -> (B, K*T, ...): a sample's K views become K*T positions of one
    sample (a view of a contiguous tensor), so sums over positions (ghost/direct norms,
    the clipped GEMM) cover the sum over views with no new math."""
    if group == 1:
        return tensor
    return tensor.reshape(tensor.shape[0] // group, group * tensor.shape[1], *tensor.shape[2:])


def sum_views(tensor: torch.Tensor, group: int) -> torch.Tensor:
    """(B*K, ...) per-row gradients -> (B, ...) per-sample gradients (sum over the views)."""
    if group == 1:
        return tensor
    return tensor.reshape(tensor.shape[0] // group, group, *tensor.shape[1:]).sum(1)


def concat_positions(
    records: list[Record], key: str, shape, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(saved[key], G) of several calls of one layer, each reshaped by ``shape(tensor)`` and
    concatenated along ``dim``: a sample's positions in all calls, as if one call had seen
    them (the layer's per-sample gradient is a sum over positions)."""
    saved = torch.cat([shape(r.saved[key]) for r in records], dim)
    grad_output = torch.cat([shape(r.grad_output) for r in records], dim)
    return saved, grad_output


def merged_record(records: list[Record], key: str, saved, grad_output) -> Record:
    first = records[0]
    return Record(module=first.module, name=first.name, saved={key: saved}, grad_output=grad_output)


def rows_scale(scale: torch.Tensor | None, group: int) -> torch.Tensor | None:
    """(B,) per-sample scale -> (B*K,) per-row scale: every view of sample i gets c_i (the
    clipped sum is linear in the rows, so sum_i c_i sum_k g_ik)."""
    if scale is None or group == 1:
        return scale
    return scale.repeat_interleave(group)


class LayerRule:
    """Base class of the per-layer rules; subclasses implement the three methods."""

    def forward(self, module: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, dict]:
        """Run the layer with detached parameters; return (output, saved tensors)."""
        raise NotImplementedError

    def norm_sq(self, record: Record) -> torch.Tensor:
        """(B,) float32 squared norms of the trainable params' per-sample gradients (of G)."""
        raise NotImplementedError

    def accumulate(
        self,
        record: Record,
        scale: torch.Tensor | None,
        grads: dict[nn.Parameter, torch.Tensor],
    ) -> None:
        """grads[p] += sum_i scale_i * grad_i(p) for the trainable params (float64 buffers);
        ``scale`` None is the plain sum (no per-sample factor, no extra pass over G)."""
        raise NotImplementedError

    def merge(self, records: list[Record]) -> Record:
        """One record whose per-sample gradients are the sums over ``records``, the calls of
        one layer in one forward pass (its per-sample gradient is the sum over its uses).
        Rules that cannot merge leave this as it is: the tape then refuses a second call."""
        raise NotImplementedError


def trainable(module: nn.Module, name: str) -> nn.Parameter | None:
    """``module.<name>`` if it is a parameter that requires grad, else None."""
    param = getattr(module, name, None)
    if isinstance(param, nn.Parameter) and param.requires_grad:
        return param
    return None


def detached(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.detach()


def buffer_for(grads: dict[nn.Parameter, torch.Tensor], param: nn.Parameter) -> torch.Tensor:
    """The float64 accumulator of ``param`` (created on first use).

    float64, not float32: the adds into the logical batch's sum are a chain whose rounding
    depends on the running total, so in float32 one sample could move the total just below a
    power of two and change how every later add rounds (1.06 C to 2 C measured with 3k to
    12k aligned samples; tests/test_attacks_round3.py). In float64 that chain is 2^29 times
    smaller, inside the strategies' 2^-10 sensitivity slack for any realistic batch."""
    buf = grads.get(param)
    if buf is None:
        buf = torch.zeros(param.shape, dtype=torch.float64, device=param.device)
        grads[param] = buf
    return buf


def register_rule(*keys: type[nn.Module] | str):
    """Class decorator: register one rule instance for the given module types, or for classes
    of optional libraries by qualified name, ``"package.module.QualName"`` (exact classes;
    nothing is imported)."""

    def wrap(cls: type[LayerRule]) -> type[LayerRule]:
        instance = cls()
        for key in keys:
            (_BY_NAME if isinstance(key, str) else _REGISTRY)[key] = instance
        return cls

    return wrap


def register_fallback(rule: LayerRule) -> None:
    """Install the rule used when no registered one applies (it says what it ``covers``)."""
    _FALLBACK[:] = [rule]


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s exact type, else for a registered base class, else the
    generic per-sample fallback when it covers the module (None: nothing does).

    A subclass inherits its base's rule only if it does not override ``forward``: a rule
    replays the base layer's computation, which a custom forward may not match, so such a
    subclass (timm's LayerNorm2d, a GroupNorm with its own forward) goes to the fallback.
    """
    rule = _REGISTRY.get(type(module))
    if rule is None:
        rule = _BY_NAME.get(f"{type(module).__module__}.{type(module).__qualname__}")
    if rule is not None:
        return rule
    for klass in type(module).__mro__[1:]:
        if klass in _REGISTRY and type(module).forward is klass.forward:
            return _REGISTRY[klass]
    for fallback in _FALLBACK:
        if fallback.covers(module):
            return fallback
    return None


def is_fallback(rule: LayerRule | None) -> bool:
    """Whether ``rule`` is the generic fallback (it covers every own parameter)."""
    return rule is not None and rule in _FALLBACK


def registered_types() -> tuple[type[nn.Module], ...]:
    return tuple(_REGISTRY)
