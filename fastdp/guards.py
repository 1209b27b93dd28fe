"""Guards against modules that carry data out around the clipped, noised gradient.

Two ways a module leaks in training mode that no per-sample rule can fix:
- it mixes samples in the forward (batch statistics): one sample then moves every other
  sample's output and gradient, so clipping each "per-sample" gradient bounds nothing;
- it writes buffers from the data (running statistics): the buffers are released with the
  model but never clipped or noised.

``check_data_independent`` refuses the known offenders at ``make_private``; ``BufferGuard``
catches them (and anything else that writes a buffer in place) in every training forward,
e.g. after ``model.train()`` put a frozen BatchNorm back in training mode.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


def mixing_reason(module: nn.Module) -> str | None:
    """Why ``module`` (in its current mode) mixes samples or writes buffers from data."""
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


def _refusal(name: str, module: nn.Module, reason: str) -> ValueError:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return ValueError(
        f"module '{name}' ({kind}) {reason}. Replace it with nn.GroupNorm (e.g. "
        "nn.GroupNorm(min(32, C), C)) or nn.LayerNorm; for a frozen pretrained backbone call "
        "eval() on the module after every model.train() (eval mode uses the stored statistics "
        "and writes nothing)."
    )


def check_data_independent(model: nn.Module) -> None:
    """Refuse modules that, in their current mode, mix samples or write buffers from data."""
    for name, module in model.named_modules():
        reason = mixing_reason(module)
        if reason is not None:
            raise _refusal(name or type(module).__name__, module, reason)


class BufferGuard:
    """Checked around each training forward: no known mixing module in training mode, and
    no buffer written in place (its version counter moved)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(name or type(m).__name__, m) for name, m in model.named_modules()]
        self.buffers = [
            (f"{name}.{bname}" if name else bname, buf)
            for name, m in model.named_modules()
            for bname, buf in m.named_buffers(recurse=False)
            if buf is not None
        ]
        self._versions: list[int] | None = None

    def before(self) -> None:
        for name, module in self.modules:
            reason = mixing_reason(module)
            if reason is not None:
                raise _refusal(name, module, reason)
        self._versions = [buf._version for _, buf in self.buffers]

    def after(self) -> None:
        if self._versions is None:
            return
        versions, self._versions = self._versions, None
        for (name, buf), version in zip(self.buffers, versions):
            if buf._version != version:
                raise RuntimeError(
                    f"buffer '{name}' was written in place during a training forward pass: "
                    "a buffer computed from the data is released with the model without "
                    "clipping or noise. Make the module compute it without writing state in "
                    "training mode, or put the module in eval() mode."
                )
