"""The fallback: per-sample gradients by torch.func for modules that have no exact rule.

A module owning trainable parameters without a rule (a raw ``nn.Parameter`` such as a ViT
class token or a layer-scale gamma, a norm subclass that overrides ``forward``, PReLU,
InstanceNorm with affine, ...) is run with its own parameters detached, and its inputs
(positional and keyword, tensors and not) are saved. In backward, sample i's gradient of the
module's OWN parameters (``recurse=False``) is the vector-Jacobian product of the module's
forward, replayed on sample i's inputs (as a batch of one), with sample i's output gradient
G_i; ``torch.func.vmap`` runs that replay for all samples at once. Only those parameters'
per-sample gradients are materialised, (B, *shape) each.

Children are fixed functions in the replay: a parent whose own parameter enters its forward
(timm's ``VisionTransformer.cls_token``) replays its whole forward, children included, with
their rule routing switched off (their parameters are constants there; their own per-sample
gradients come from their own rules). That costs about one more forward and backward of the
subtree per step, which ``check_model`` reports once with a warning, as it does when the
materialised gradients exceed 1% of the model's parameters.

Sensitivity: the norm returned is an upper bound, rounding included, of the norm of the
float32 per-sample gradient that ``accumulate`` adds (the same materialised tensor, times its
clip factor rounded once to float32): squares of float32 numbers are exact in float64, their
float64 sum is off by at most gamma_n relative (n terms), and the bound is rounded up to
float32.

Forward randomness (dropout with p > 0 in train mode) cannot be replayed per sample: the
replay refuses it instead of drawing different masks.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdp.rules.base import (
    LayerRule,
    Record,
    buffer_for,
    register_fallback,
    rows_scale,
    sum_views,
)

_REPLAY = "_replay"  # key of the saved holder carrying the inputs' structure
_BATCHED = object()  # placeholder in the template: the tensor is in ``saved``
FALLBACK_WARN_FRACTION = 0.01

# what the fallback cannot make exact: (types, why, fix)
_REFUSED: list[tuple[tuple[type, ...], str, str]] = [
    (
        (nn.modules.batchnorm._BatchNorm,),
        "mixes samples through batch statistics, so per-sample gradients do not exist",
        "replace it with nn.GroupNorm (or LayerNorm), e.g. nn.GroupNorm(min(32, C), C)",
    ),
    (
        (nn.RNNBase,),
        "is a fused recurrent kernel: fastdp has no per-sample rule for it, and a recurrence "
        "built from nn.Linear cells calls each cell once per time step, which fastdp refuses",
        "freeze it with requires_grad_(False) (e.g. a pretrained encoder) or use a "
        "convolution or attention block (nn.TransformerEncoder is supported)",
    ),
    (
        (nn.ParameterDict, nn.ParameterList),
        "is a parameter container, which has no forward: its parent module uses the parameters "
        "in its own forward (peft's LoRA on an embedding keeps lora_embedding_A/B so), where "
        "fastdp sees no call of the container to take per-sample gradients from",
        "keep trainable parameters in the module that uses them (as its own attributes or in a "
        "layer fastdp has a rule for), apply LoRA to Linear target modules only, or freeze them",
    ),
    (
        (nn.MultiheadAttention,),
        "is an nn.MultiheadAttention that make_private could not swap for fastdp's exact "
        "DPMultiheadAttention (fastdp/rules/attention.py)",
        "pass the model to make_private (it swaps them), use kdim = vdim = embed_dim, or freeze "
        "it with requires_grad_(False)",
    ),
]


def own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own (recurse=False) parameters that require grad, by name."""
    return {name: p for name, p in module._parameters.items() if p is not None and p.requires_grad}


# the same, for classes of optional libraries, by qualified name (no import needed)
_REFUSED_BY_NAME: dict[str, tuple[str, str]] = {
    f"peft.tuners.lora.dora.{name}": (
        "is a DoRA magnitude of an embedding or convolution adapter, which fastdp has no rule "
        "for (DoRA on Linear layers is supported: fastdp/rules/dora.py)",
        "apply DoRA to Linear target modules only, or use plain LoRA there "
        "(peft.LoraConfig(use_dora=False))",
    )
    for name in ("DoraEmbeddingLayer", "_DoraConvNdLayer")
}


def refusal(module: nn.Module) -> tuple[str, str] | None:
    """(why, fix) when the fallback cannot handle ``module``, else None."""
    for types, why, fix in _REFUSED:
        if isinstance(module, types):
            return why, fix
    for klass in type(module).__mro__:
        found = _REFUSED_BY_NAME.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """Temporarily make ``module.<name>`` the given tensors (detached or functorch-wrapped)."""
    originals = {name: module._parameters[name] for name in tensors}
    try:
        module._parameters.update(tensors)
        yield
    finally:
        module._parameters.update(originals)


@contextlib.contextmanager
def _plain_forwards(module: nn.Module):
    """Switch off the tape's routing in ``module``'s subtree (the replay must neither record
    calls nor detach the children's parameters differently from a plain forward)."""
    from fastdp.routing import _RoutedForward  # routing imports the rules: import late

    removed = []
    for sub in module.modules():
        routed = sub.__dict__.get("forward")
        if isinstance(routed, _RoutedForward):
            removed.append((sub, routed))
            del sub.forward
    try:
        yield
    finally:
        for sub, routed in removed:
            sub.forward = routed


class GenericRule(LayerRule):
    """torch.func per-sample gradients of a module's own parameters (see module docstring)."""

    may_save_output = True  # an arbitrary forward may keep its output for its own backward

    def covers(self, module: nn.Module) -> bool:
        return bool(own_trainable(module)) and refusal(module) is None

    def forward(self, module: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, dict]:
        params = {name: p.detach() for name, p in own_trainable(module).items()}
        with _swapped(module, params):
            output = type(module).forward(module, *args, **kwargs)
        if not isinstance(output, torch.Tensor) or output.dim() == 0:
            raise TypeError(
                f"{type(module).__qualname__} has trainable parameters of its own "
                f"({', '.join(params)}) and no per-sample rule, and its forward returned "
                f"{type(output).__name__}: fastdp's per-sample fallback needs one batch-first "
                "tensor. Move those parameters into a submodule that returns a tensor, or "
                "freeze them with requires_grad_(False)."
            )
        batch = output.shape[0]
        leaves, spec = tree_flatten((args, kwargs))
        template, saved = [], {}
        for position, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.dim() and leaf.shape[0] == batch:
                saved[f"input{position}"] = leaf.detach()
                template.append(_BATCHED)
            else:  # broadcast tensors, numbers, None, modules: replayed as they were
                template.append(leaf.detach() if isinstance(leaf, torch.Tensor) else leaf)
        # an integer tensor: Record.zero_samples keeps it (and its attribute) as it is
        holder = torch.empty(batch, 0, dtype=torch.int8, device=output.device)
        holder.fastdp_replay = (spec, template)
        saved[_REPLAY] = holder
        return output, saved

    def norm_sq(self, record: Record) -> torch.Tensor:
        per_sample = {
            name: sum_views(grad, record.group)  # a sample's K views: their sum
            for name, grad in _per_sample_grads(record).items()
        }
        record.extra["per_sample"] = per_sample  # accumulate adds exactly these
        return rounded_up_norm_sq(per_sample.values(), record.batch_size, record.grad_output)

    def accumulate(self, record: Record, scale: torch.Tensor | None, grads: dict) -> None:
        module = record.module
        per_sample = record.extra.pop("per_sample", None)
        if per_sample is None:  # no norms asked (Noisy-SGD): one batched vjp of scale * G
            for name, total in _summed_grads(record, rows_scale(scale, record.group)).items():
                buffer_for(grads, module._parameters[name]).add_(total.float())
            return
        for name, grad in per_sample.items():
            grad = grad.float()
            buf = buffer_for(grads, module._parameters[name])
            if scale is None:
                buf.add_(grad.sum(0))
            else:  # dropped samples (scale 0) may hold NaN: 0 * NaN must not reach the sum
                keep = (scale != 0).view((-1,) + (1,) * (grad.dim() - 1))
                grad = torch.where(keep, grad, torch.zeros((), device=grad.device))
                buf.add_(torch.einsum("b,b...->...", scale.float(), grad))


def rounded_up_norm_sq(grads, batch: int, like: torch.Tensor) -> torch.Tensor:
    """(B,) float32 upper bound of sum_p ||float32(grad_p[i])||^2 (see module docstring)."""
    total = torch.zeros(batch, dtype=torch.float64, device=like.device)
    n_terms = 0
    for grad in grads:
        flat = grad.float().flatten(1).double()
        total += flat.square().sum(1)
        n_terms += flat.shape[1]
    unit = 2.0**-53
    slack = (n_terms + 2) * unit  # gamma_n for the sum, one more rounding for this product
    # accumulate rounds scale_i * g_i to float32 once per element: (1 + u32)^2 on the square
    bound = total * (1.0 + slack / (1.0 - slack)) * (1.0 + 2.0**-23) ** 2
    rounded = bound.float()
    return torch.where(rounded.double() < bound, torch.nextafter(rounded, _inf(rounded)), rounded)


def _inf(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("inf"))


def _replay_inputs(record: Record):
    """(batched tensors, function rebuilding (args, kwargs) from one sample's tensors)."""
    spec, template = record.saved[_REPLAY].fastdp_replay
    keys = [key for key in record.saved if key != _REPLAY]
    positions = [int(key.removeprefix("input")) for key in keys]
    batched = tuple(record.saved[key] for key in keys)

    def rebuild(tensors, unsqueeze: bool):
        leaves = list(template)
        for position, tensor in zip(positions, tensors):
            leaves[position] = tensor.unsqueeze(0) if unsqueeze else tensor
        return tree_unflatten(leaves, spec)

    return batched, rebuild


def _per_sample_grads(record: Record) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)} per-sample gradients of the module's own trainable parameters."""
    module = record.module
    params = {name: p.detach() for name, p in own_trainable(module).items()}
    batched, rebuild = _replay_inputs(record)

    def one_sample(params, tensors, grad_output):
        args, kwargs = rebuild(tensors, unsqueeze=True)

        def forward(params):
            with _swapped(module, params):
                return type(module).forward(module, *args, **kwargs)

        output, vjp = torch.func.vjp(forward, params)
        return vjp(grad_output.unsqueeze(0).to(output.dtype))[0]

    replay = torch.func.vmap(one_sample, in_dims=(None, 0, 0), randomness="error")
    with torch.no_grad(), _plain_forwards(module):
        try:
            return replay(params, batched, record.grad_output)
        except RuntimeError as err:
            if "random" not in str(err):
                raise
            raise RuntimeError(
                f"module '{record.name}' ({type(module).__qualname__}) uses fastdp's per-sample "
                "fallback, whose replay of the forward cannot reproduce random draws (dropout "
                "with p > 0 in train mode): set those dropout rates to 0 inside this module."
            ) from err


def _summed_grads(record: Record, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{name: sum_i scale_i grad_i} by one vjp of the batched forward (no per-sample copy)."""
    module = record.module
    params = {name: p.detach() for name, p in own_trainable(module).items()}
    batched, rebuild = _replay_inputs(record)
    args, kwargs = rebuild(batched, unsqueeze=False)
    grad_output = record.grad_output
    if scale is not None:
        grad_output = grad_output * scale.view((-1,) + (1,) * (grad_output.dim() - 1)).to(
            grad_output.dtype
        )

    def forward(params):
        with _swapped(module, params):
            return type(module).forward(module, *args, **kwargs)

    with torch.no_grad(), _plain_forwards(module):
        output, vjp = torch.func.vjp(forward, params)
        return vjp(grad_output.to(output.dtype))[0]


def fallback_warning(display: str, module: nn.Module, model: nn.Module) -> str | None:
    """The one warning make_private gives for a module on the fallback, or None if cheap:
    when its materialised per-sample gradients exceed 1% of the model's parameters, or when
    its replay runs child modules that have parameters (about one more forward+backward)."""
    own = own_trainable(module)
    own_size = sum(p.numel() for p in own.values())
    model_size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    children = [
        name
        for name, sub in module.named_modules()
        if sub is not module and any(p is not None for p in sub._parameters.values())
    ]
    reasons = []
    if own_size > FALLBACK_WARN_FRACTION * model_size:
        reasons.append(
            f"its per-sample gradients are materialised ({own_size:,} parameters per sample, "
            f"{own_size / max(model_size, 1):.0%} of the model)"
        )
    if children:
        reasons.append(
            f"its forward is replayed per sample in backward, including {len(children)} child "
            "module(s) with parameters (about one more forward and backward of this subtree)"
        )
    if not reasons:
        return None
    return (
        f"fastdp: module '{display}' ({type(module).__qualname__}) has no exact per-sample rule "
        f"for its parameters {sorted(own)} and uses the torch.func fallback: "
        + "; ".join(reasons)
        + ". Moving those parameters into a layer with a rule (nn.Linear, nn.Embedding, the "
        "norms) makes it cheaper."
    )


def warn_fallback(display: str, module: nn.Module, model: nn.Module) -> None:
    message = fallback_warning(display, module, model)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)


GENERIC = GenericRule()
register_fallback(GENERIC)
