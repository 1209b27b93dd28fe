"""Guards against modules that carry data out around the clipped, noised gradient.

Two ways a module leaks in training mode that no per-sample rule can fix:
- it mixes samples in the forward (batch statistics): one sample then moves every other
  sample's output and gradient, so clipping each "per-sample" gradient bounds nothing;
- it writes state from the data (running statistics, renormalised embedding rows, a
  data-dependent initialisation): that state is released with the model but never clipped
  or noised.

``check_data_independent`` refuses the known offenders at ``make_private``; ``BufferGuard``
catches them (and anything else that writes a buffer or parameter, in place or by
reassignment) around every forward of the private model, e.g. after ``model.train()`` put a
frozen BatchNorm back in training mode. Mixing by plain tensor code (``x - x.mean(0)``) is
caught by the batch-axis probe (fastdp/probe.py), which compares per-sample outputs.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


def mixing_reason(module: nn.Module) -> str | None:
    """Why ``module`` (in its current mode) mixes samples or writes state from data."""
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return (
            "has max_norm set: its forward renormalises, in place and without noise, exactly "
            "the rows of the tokens in the batch (also when frozen or in eval mode), which "
            "reveals which tokens were present. Construct it with max_norm=None"
        )
    if not module.training:
        return None
    if isinstance(module, _BatchNorm):
        return (
            "normalises with batch statistics in training mode (one sample moves every "
            "other sample's output) and writes running_mean/running_var from the data without "
            "noise"
        )
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        return "writes running statistics from the data (track_running_stats=True) without noise"
    return None


_NORM_FIX = (
    ". Replace it with nn.GroupNorm (e.g. nn.GroupNorm(min(32, C), C)) or nn.LayerNorm; for a "
    "frozen pretrained backbone call eval() on the module after every model.train() (eval "
    "mode uses the stored statistics and writes nothing)."
)


def _refusal(name: str, module: nn.Module, reason: str) -> ValueError:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    fix = "." if isinstance(module, nn.Embedding) else _NORM_FIX
    return ValueError(f"module '{name}' ({kind}) {reason}{fix}")


def check_data_independent(model: nn.Module) -> None:
    """Refuse modules that, in their current mode, mix samples or write buffers from data."""
    for name, module in model.named_modules():
        reason = mixing_reason(module)
        if reason is not None:
            raise _refusal(name or type(module).__name__, module, reason)


class BufferGuard:
    """Checked around each forward of the private model: no known mixing module in its
    current mode, and no buffer or parameter written in place (its version counter moved),
    reassigned or added."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._state: dict[str, tuple[object, int]] | None = None

    def _snapshot(self) -> dict[str, tuple[object, int]]:
        state = {}
        for name, module in self.model.named_modules():
            for kind in ("_buffers", "_parameters"):
                for key, tensor in getattr(module, kind).items():
                    if tensor is not None:
                        full = f"{name}.{key}" if name else key
                        state[full] = (tensor, tensor._version)
        return state

    def before(self) -> None:
        for name, module in self.model.named_modules():
            reason = mixing_reason(module)
            if reason is not None:
                raise _refusal(name or type(module).__name__, module, reason)
        self._state = self._snapshot()

    def after(self) -> None:
        if self._state is None:
            return
        before, self._state = self._state, None
        after = self._snapshot()
        for name in sorted(set(before) | set(after)):
            old, new = before.get(name), after.get(name)
            if old is not None and new is not None and old[0] is new[0] and old[1] == new[1]:
                continue
            change = "added" if old is None else "removed" if new is None else "written"
            if old is not None and new is not None and old[0] is not new[0]:
                change = "reassigned"
            raise RuntimeError(
                f"'{name}' was {change} during a forward pass of the private model: state "
                "computed from the data is released with the model without clipping or noise. "
                "Make the module compute it without writing state in training (for running "
                "statistics: eval() mode, or a layer without them)."
            )
