"""DPOptimizer: wraps the user's optimizer and turns clipped sums into one noisy step.

The tape accumulates sum_i c_i g_i into float64 buffers over the micro-batches of a logical
batch. ``step()`` after a micro-batch that is not the last one only returns; after the last
one (or after every call when no private loader drives it) it forms

    g = (sum + N(0, (sigma C)^2 I)) / expected_batch_size

exactly once, hands it to the wrapped optimizer (fused kernel for SGD/AdamW, else p.grad +
``optimizer.step()``), zeroes the accumulators and advances the logical step counter, which
keys both the noise and the Poisson sampling.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from fastdp import habits
from fastdp.errors import LoopProtocolError
from fastdp.kernels.noise import NoiseKey, prefetch_noise
from fastdp.kernels.noisy_update import noisy_gradient_torch
from fastdp.state import PrivateRun
from fastdp.tape import Tape


class DPOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` view of the user's optimizer with a private ``step``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own, so LR
    schedulers and ``state_dict()`` / ``load_state_dict()`` work unchanged.
    """

    def __init__(
        self, optimizer: Optimizer, *, tape: Tape, params: list[nn.Parameter], run: PrivateRun
    ) -> None:
        self.original_optimizer = optimizer
        self.tape = tape
        self.params = params
        self.run = run
        self._param_names: dict[nn.Parameter, str] = {}
        self.last_step_updated = False
        self.last_step_sampled = False  # whether the private loader drew the last logical batch
        self.step_hooks: list[Callable[[DPOptimizer], None]] = []
        self._streams = {p: k for k, p in enumerate(params)}
        self._pending_last: bool | None = None
        self._warned_unsampled = False
        # the count of dropped (non-finite) samples depends on the data: it is a release, so
        # it is kept as a tensor and read only on request (``dropped_samples``), or warned
        # about at each logical step when the user opts in (``warn_dropped = True``)
        self.warn_dropped = False
        self._dropped: torch.Tensor | None = None

    # ---- the run's state (owned by ``run``; read-only where privacy depends on it) -------
    @property
    def seed(self) -> int:
        """The run's noise and sampling secret (128 bits)."""
        return self.run.secret

    @property
    def logical_step(self) -> int:
        return self.run.logical_step

    @property
    def micro_steps_in_batch(self) -> int:
        return self.run.micro_step

    @property
    def world_size(self) -> int:
        return self.run.world_size

    @property
    def expected_batch_size(self) -> float:
        return self.run.expected_batch_size

    @property
    def loss_reduction(self) -> str:
        return self.run.loss_reduction

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
        return habits.with_run_position(self, self.original_optimizer.state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(habits.check_run_position(self, state_dict))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ``p.grad`` only; the clipped sums of an unfinished logical batch stay."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    @property
    def dropped_samples(self) -> int:
        """Samples of the last logical batch dropped for a non-finite gradient (Noisy-SGD:
        the rows of dropped micro-batches). Reading it is a host sync and a release that is
        not differentially private: a diagnostic, off the training path."""
        return 0 if self._dropped is None else int(self._dropped)

    def _warn_dropped(self) -> None:
        dropped = self.dropped_samples
        if dropped:
            warnings.warn(
                f"fastdp: {dropped} sample(s) of the last logical batch had a non-finite "
                "(NaN/Inf) gradient and were dropped: they contributed zero. (This count is "
                "not private; set optimizer.warn_dropped = False for runs you release.)",
                RuntimeWarning,
                stacklevel=4,
            )

    # ---- private step ---------------------------------------------------------------------
    @property
    def noise_multiplier(self) -> float:
        """sigma (read-only: clipping, noise and accounting must change together)."""
        return self.run.noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value) -> None:
        raise AttributeError(_READ_ONLY.format(name="noise_multiplier"))

    @property
    def max_grad_norm(self) -> float:
        """The clip norm C of the summed gradient (read-only, see ``noise_multiplier``)."""
        return self.run.strategy.sensitivity

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        raise AttributeError(_READ_ONLY.format(name="max_grad_norm"))

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum: sigma * C."""
        return self.run.noise_std

    @property
    def grad_sums(self) -> dict[nn.Parameter, torch.Tensor]:
        """float64 clipped sums accumulated since the last logical step (reading them closes
        the current micro-batch: its clipping is finished first)."""
        self.tape.finish()
        return self.tape.grads

    def signal_micro_batch(self, is_last: bool | None, size: int | None = None) -> None:
        """Called by the private loader before it yields each micro-batch of ``size``
        samples (every handled layer must then see that leading dimension), and with
        ``is_last`` None when the loop leaves a yielded micro-batch without its step()."""
        self._pending_last = None if is_last is None else bool(is_last)
        self.tape.expected_batch = size

    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.tape.finish()
        if self.tape.invalid_reason is not None:
            raise RuntimeError(
                "the current logical batch was aborted by an earlier error and its clipped "
                f"sums are incomplete ({self.tape.invalid_reason}). Fix the model, then call "
                "optimizer.discard_logical_batch() to start a new one."
            )
        if self.run.strategy.private:
            self._refuse_plain_gradients()
        pending, self._pending_last = self._pending_last, None
        habits.check_lr_within_logical_batch(self, pending)  # a scheduler per micro-batch
        if pending is None and self.run.micro_step:
            self.tape.reset()
            self.tape.invalid_reason = "step() twice for one micro-batch"
            raise RuntimeError(
                "optimizer.step() was called twice for one micro-batch of the private loader "
                "(or after the loop left a logical batch unfinished): a second backward on "
                "the same samples would be clipped and counted again. Call step() exactly once "
                "per yielded micro-batch; call optimizer.discard_logical_batch() to start over."
            )
        self.tape.close_micro_batch()
        self.tape.expected_batch = None
        if pending is False:
            self.last_step_updated = False
            self.run.micro_step += 1
            return loss
        if pending is None and self.run.strategy.private:
            habits.refuse_trainer_loop()  # a transformers.Trainer on its own loader
        self._logical_step(sampled=pending is not None)
        return loss

    def index_parameter_names(self) -> None:
        """Remember 'layer.param' names for error messages (after the tape is attached)."""
        self._param_names = {
            p: f"{name}.{pname}"
            for name, module in self.tape.layers
            for pname, p in module.named_parameters(recurse=False)
        }

    def _refuse_plain_gradients(self) -> None:
        """No parameter may carry an ordinary (unclipped) autograd gradient at step time:
        one would come from a parameter used outside its layer's forward, or unfrozen /
        added after make_private, and the wrapped optimizer would apply it as it is."""
        with_grad = [
            p for group in self.original_optimizer.param_groups for p in group["params"]
            if p.grad is not None
        ]  # fmt: skip
        if not with_grad:
            return  # the usual case: routed layers' parameters get no autograd gradient
        norms = torch.stack(torch._foreach_norm([p.grad for p in with_grad]))
        if bool((norms == 0).all()):  # zeros (set_to_none=False) pass; one sync
            return
        for p, norm in zip(with_grad, norms.tolist()):
            if norm != 0:
                name = self._param_names.get(p, f"a parameter of shape {tuple(p.shape)}")
                raise LoopProtocolError(
                    f"{name} has an ordinary, unclipped gradient: it was used outside its "
                    "layer's forward (e.g. F.linear(x, layer.weight)), unfrozen or added "
                    "after make_private, or p.grad was set by hand. Call "
                    "optimizer.zero_grad() and make the model private again after "
                    "changing which parameters train."
                )

    def discard_logical_batch(self) -> None:
        """Drop the clipped sums of the unfinished logical batch (nothing is applied)."""
        self.tape.clear()
        self.tape.reset()
        self.run.micro_step = 0

    def mid_logical_batch(self) -> bool:
        """True when clipped sums of an unfinished logical batch are pending."""
        if self.micro_steps_in_batch or self.tape.pending():
            return True
        return any(bool(buf.any()) for buf in self.tape.grads.values())

    @torch.no_grad()
    def _logical_step(self, sampled: bool) -> None:
        """One noisy update. ``sampled``: the private loader drew this logical batch (Poisson
        at rate q); otherwise the batch came from elsewhere and gets no amplification."""
        if not sampled and not self._warned_unsampled and self.run.strategy.private:
            self._warned_unsampled = True
            warnings.warn(
                "optimizer.step() closed a logical batch that the private loader did not yield "
                "(e.g. the original DataLoader was iterated after make_private). fastdp "
                "accounts such a step with sample rate 1 (no amplification by sampling), so "
                "epsilon grows much faster: iterate the loader make_private returned.",
                UserWarning,
                stacklevel=3,
            )
        if _world_size() != self.world_size:
            raise RuntimeError(
                f"make_private saw {self.world_size} process(es) but {_world_size()} are "
                "running now: initialise the process group before make_private so each rank "
                "samples its share (otherwise the all-reduced sum outgrows the noise)."
            )
        params = [p for p in self.params if p.requires_grad]  # frozen since: no update
        sums, factor = self.tape.logical_sums(params)
        if self.world_size > 1:
            sums = {p: s * factor if factor != 1 else s for p, s in sums.items()}
            factor = 1.0
            for p in params:
                dist.all_reduce(sums[p])
        # the logical step's one host sync: is the sum finite?
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(list(sums.values())))).all()):
            if not self.tape.drop_non_finite():
                # per-sample NaN/Inf is dropped in backward; this is overflow of finite values
                raise RuntimeError(
                    "the clipped sum of this logical batch is not finite (overflow); nothing "
                    "was applied. Call optimizer.discard_logical_batch() and lower the learning "
                    "rate or the loss scale."
                )
            sums, factor = self.tape.logical_sums(params)
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        # (factor * sum + std * xi) * scale == (sum + (std / factor) * xi) * (factor * scale)
        std = self.noise_std / factor if factor else 0.0
        noise = NoiseKey(self.seed, self.logical_step, std)
        key = dict(noise=noise, scale=scale * factor)
        if not _fused_noisy_step(self.original_optimizer, sums, streams=self._streams, **key):
            for p in params:
                p.grad = noisy_gradient_torch(sums[p], stream=self._streams[p], **key).to(p.dtype)
            self.original_optimizer.step()
            for p in params:
                p.grad = None
        self.tape.clear()
        self._dropped = self.tape.take_dropped()
        if self.warn_dropped:
            self._warn_dropped()
        self.run.micro_step = 0
        self.run.logical_step += 1
        self.last_step_updated = True
        self.last_step_sampled = sampled
        if self.noise_std > 0 and self.params[0].device.type == "cpu":
            prefetch_noise(
                {self._streams[p]: tuple(p.shape) for p in params},
                NoiseKey(self.seed, self.logical_step, self.noise_std),
            )
        for hook in self.step_hooks:
            hook(self)


_READ_ONLY = (
    "DPOptimizer.{name} is read-only: clipping, noise and accounting were set up together "
    "by make_private. Make the model private again with the new value."
)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _fused_noisy_step(optimizer: Optimizer, grad_sums, **kwargs) -> bool:
    from fastdp.optimizers import fused_noisy_step

    return fused_noisy_step(optimizer, grad_sums, **kwargs)
