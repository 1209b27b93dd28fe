"""DPOptimizer: wraps the user's optimizer and turns clipped sums into one noisy step.

The tape accumulates sum_i c_i g_i into float32 buffers over the micro-batches of a logical
batch. ``step()`` after a micro-batch that is not the last one only returns; after the last
one (or after every call when no private loader drives it) it forms

    g = (sum + N(0, (sigma C)^2 I)) / expected_batch_size

exactly once, hands it to the wrapped optimizer (fused kernel for SGD/AdamW, else p.grad +
``optimizer.step()``), zeroes the accumulators and advances the logical step counter, which
keys both the noise and the Poisson sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from fastdp.kernels.noisy_update import noisy_gradient_torch
from fastdp.tape import Tape


class DPOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` view of the user's optimizer with a private ``step``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own, so LR
    schedulers and ``state_dict()`` / ``load_state_dict()`` work unchanged.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        tape: Tape,
        params: list[nn.Parameter],
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        loss_reduction: str,
        seed: int,
    ) -> None:
        self.original_optimizer = optimizer
        self.tape = tape
        self.params = params
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.loss_reduction = loss_reduction
        self.seed = int(seed)
        self.logical_step = 0
        self.micro_steps_in_batch = 0  # micro-batches of the unfinished logical batch
        self.last_step_updated = False
        self.step_hooks: list[Callable[[DPOptimizer], None]] = []
        self._streams = {p: k for k, p in enumerate(params)}
        self._pending_last: bool | None = None

    # ---- the wrapped optimizer's state ----------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.original_optimizer.defaults = value

    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ``p.grad`` only; the clipped sums of an unfinished logical batch stay."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    # ---- private step ---------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum: sigma * C."""
        return self.noise_multiplier * self.max_grad_norm

    @property
    def grad_sums(self) -> dict[nn.Parameter, torch.Tensor]:
        """float32 clipped sums accumulated since the last logical step."""
        return self.tape.grads

    def signal_micro_batch(self, is_last: bool) -> None:
        """Called by the private loader before it yields each micro-batch."""
        self._pending_last = bool(is_last)

    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.tape.invalid_reason is not None:
            raise RuntimeError(
                "the current logical batch was aborted by an earlier error and its clipped "
                f"sums are incomplete ({self.tape.invalid_reason}). Fix the model, then call "
                "optimizer.discard_logical_batch() to start a new one."
            )
        pending, self._pending_last = self._pending_last, None
        if pending is False:
            self.last_step_updated = False
            self.micro_steps_in_batch += 1
            return loss
        self._logical_step()
        return loss

    def discard_logical_batch(self) -> None:
        """Drop the clipped sums of the unfinished logical batch (nothing is applied)."""
        for buf in self.tape.grads.values():
            buf.zero_()
        self.tape.reset()
        self.micro_steps_in_batch = 0

    def mid_logical_batch(self) -> bool:
        """True when clipped sums of an unfinished logical batch are pending."""
        if self.micro_steps_in_batch:
            return True
        return any(bool(buf.any()) for buf in self.tape.grads.values())

    @torch.no_grad()
    def _logical_step(self) -> None:
        grads = self.tape.grads
        for p in self.params:
            if p not in grads:
                grads[p] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.params:
                dist.all_reduce(grads[p])
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        sums = {p: grads[p] for p in self.params}
        key = dict(noise_std=self.noise_std, scale=scale, seed=self.seed, step=self.logical_step)
        if not _fused_noisy_step(self.original_optimizer, sums, streams=self._streams, **key):
            for p in self.params:
                p.grad = noisy_gradient_torch(sums[p], stream=self._streams[p], **key).to(p.dtype)
            self.original_optimizer.step()
        for buf in grads.values():
            buf.zero_()
        self.tape.dropped = 0
        self.micro_steps_in_batch = 0
        self.logical_step += 1
        self.last_step_updated = True
        for hook in self.step_hooks:
            hook(self)


def _fused_noisy_step(optimizer: Optimizer, grad_sums, **kwargs) -> bool:
    try:
        from fastdp.optimizers import fused_noisy_step
    except ImportError:  # fused optimizers not built yet
        return False
    return fused_noisy_step(optimizer, grad_sums, **kwargs)
