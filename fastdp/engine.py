"""PrivacyEngine: the Opacus-style entry point (make_private, accounting, checkpoints)."""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from fastdp import checkpoint
from fastdp.accounting import epsilon_of, make_accountant, noise_for_epsilon
from fastdp.clipping import make_strategy
from fastdp.data import DPDataLoader, steps_per_epoch
from fastdp.guards import check_data_independent
from fastdp.kernels.noise import derive_secret
from fastdp.optimizer import DPOptimizer
from fastdp.plain import AutogradSums
from fastdp.rules import is_fallback, rule_for
from fastdp.rules.attention import replace_modules
from fastdp.rules.generic import refusal, warn_fallback
from fastdp.rules.hf import patch_t5_attention
from fastdp.rules.tying import TieGroup, check_tying
from fastdp.state import PrivateRun
from fastdp.tape import Tape, can_merge, clipping_layers


class PrivacyEngine:
    """Makes a model, optimizer and data loader private and tracks the privacy spent."""

    def __init__(self, accountant: str = "prv") -> None:
        self.accountant_name = accountant
        self.accountant = make_accountant(accountant)
        self.run: PrivateRun | None = None
        self.module: nn.Module | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: DPDataLoader | None = None

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float] | None,
        clipping: str = "flat",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        seed: int | None = None,
        loss_reduction: str = "mean",
        augmentation_multiplicity: int = 1,
        augment: Callable | None = None,
    ) -> tuple[nn.Module, DPOptimizer, DPDataLoader]:
        """Return (module, private optimizer, private loader); the module is modified in
        place and keeps its own parameter tensors.

        ``noise_multiplier`` sigma: the noise on the clipped sum has std sigma * C, C the
        (total) clip norm; with clipping="none" (Noisy-SGD) C defaults to 1 so the std is sigma.

        ``augmentation_multiplicity`` K (De et al. 2022): the loader yields each sample as K
        consecutive rows (view k of sample i at row i*K + k), passed through ``augment(batch)``
        (e.g. ``fastdp.datasets.MNIST1DAugment``); a sample's gradient is the mean of its K
        views' gradients, clipped once, so sensitivity, noise and accounting are unchanged.
        """
        if self.module is not None:
            raise RuntimeError("this PrivacyEngine already made a model private; use a new one")
        _check_not_ddp(module)
        if not (
            isinstance(noise_multiplier, (int, float))
            and math.isfinite(noise_multiplier)
            and noise_multiplier >= 0
        ):
            raise ValueError(
                f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}"
            )
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not (isinstance(augmentation_multiplicity, int) and augmentation_multiplicity >= 1):
            raise ValueError(
                f"augmentation_multiplicity must be an int >= 1, got {augmentation_multiplicity!r}"
            )
        if augment is not None and not callable(augment):
            raise ValueError(f"augment must be a callable batch -> batch, got {augment!r}")
        replace_modules(module)  # exact swaps (nn.MultiheadAttention), same parameters
        patch_t5_attention(module)  # T5's relative bias on batch-first bucket ids
        check_data_independent(module)
        layers = clipping_layers(module)
        tied = check_model(module)
        params = _optimizer_params(module, optimizer)
        strategy = make_strategy(clipping, max_grad_norm, [name for name, _ in layers])
        strategy.tie(tied)

        rank, world_size = _distributed()
        if seed is not None and strategy.private:
            warnings.warn(
                "an explicit seed makes this run's noise and Poisson samples reproducible: two "
                "runs with the same seed on neighbouring datasets draw identical noise, so the "
                "difference of their releases is noise-free. Use seed=None (the default, OS "
                "entropy) for anything you release; an explicit seed is for experiments.",
                UserWarning,
                stacklevel=2,
            )
        loader = DPDataLoader(
            data_loader,
            poisson_sampling=poisson_sampling,
            max_physical_batch_size=max_physical_batch_size,
            rank=rank,
            augment=augment,
        )
        run = PrivateRun(
            strategy=strategy,
            noise_multiplier=float(noise_multiplier),
            sample_rate=loader.sample_rate,
            num_samples=loader.num_samples,
            expected_batch_size=loader.expected_batch_size,
            poisson_sampling=poisson_sampling,
            loss_reduction=loss_reduction,
            world_size=world_size,
            accountant=self.accountant_name,
            secret=_shared_secret(seed, world_size),
            views=augmentation_multiplicity,
        )
        if strategy.private:
            tape = Tape(strategy, loss_reduction, grads={})
        else:  # Noisy-SGD: ordinary autograd gradients, no per-layer work (fastdp/plain.py)
            tape = AutogradSums(loss_reduction, params)
        tape.views = augmentation_multiplicity
        dp_optimizer = DPOptimizer(optimizer, tape=tape, params=params, run=run)
        loader.drive(dp_optimizer)
        tape.attach(module)
        tape.share(tied)
        dp_optimizer.index_parameter_names()
        if not poisson_sampling and strategy.private:
            warnings.warn(
                "poisson_sampling=False: epsilon is computed as for Poisson sampling at "
                "q = batch_size / N (as Opacus does), but fixed or shuffled batches do not "
                "get that amplification, so it is not a formal guarantee. Keep "
                "poisson_sampling=True for a proven epsilon.",
                UserWarning,
                stacklevel=2,
            )

        self.run = run
        self.module, self.optimizer, self.data_loader = module, dp_optimizer, loader
        dp_optimizer.step_hooks.append(self._account_step)
        return module, dp_optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | Sequence[float],
        **kwargs,
    ) -> tuple[nn.Module, DPOptimizer, DPDataLoader]:
        """make_private with sigma calibrated so that ``epochs`` epochs spend target_epsilon."""
        if kwargs.get("clipping") == "none":
            raise ValueError("clipping='none' (Noisy-SGD) has no privacy guarantee to calibrate")
        batch_size = data_loader.batch_size
        if not batch_size:
            raise ValueError("the data loader needs a batch_size to derive the sample rate")
        num_samples = len(data_loader.dataset)
        sample_rate = min(1.0, batch_size / num_samples)
        poisson = kwargs.get("poisson_sampling", True)
        steps = int(epochs) * steps_per_epoch(
            num_samples, batch_size, poisson, bool(data_loader.drop_last)
        )
        sigma = noise_for_epsilon(
            target_epsilon, target_delta, sample_rate, steps, self.accountant_name
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    @property
    def noise_multiplier(self) -> float | None:
        return None if self.run is None else self.run.noise_multiplier

    @property
    def sample_rate(self) -> float | None:
        return None if self.run is None else self.run.sample_rate

    @property
    def clipping(self) -> str | None:
        return None if self.run is None else self.run.strategy.mode

    def _account_step(self, optimizer: DPOptimizer) -> None:
        # a logical batch the private loader did not draw gets no amplification: q = 1
        sample_rate = self.run.sample_rate if optimizer.last_step_sampled else 1.0
        self.accountant.step(noise_multiplier=self.run.noise_multiplier, sample_rate=sample_rate)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step; inf for Noisy-SGD or
        sigma = 0, which carry no guarantee)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self.accountant.history:
            return 0.0
        if not self.run.strategy.private or not self.run.noise_multiplier:
            return math.inf
        return epsilon_of(self.accountant.history, delta, self.accountant_name)

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(
        self, *, path, module: nn.Module, optimizer: DPOptimizer | None = None, **extra
    ) -> None:
        """Atomically write model, optimizer, accountant and step counters to ``path``."""
        checkpoint.save(self, path=path, module=module, optimizer=optimizer, **extra)

    def load_checkpoint(
        self, *, path, module: nn.Module, optimizer: DPOptimizer | None = None
    ) -> dict:
        """Restore what ``save_checkpoint`` wrote; returns the extra entries it carried."""
        return checkpoint.load(self, path=path, module=module, optimizer=optimizer)


# ---- checks -------------------------------------------------------------------------------
def _check_not_ddp(module: nn.Module) -> None:
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "the module is wrapped in DistributedDataParallel. DDP all-reduces the ordinary, "
            "unclipped gradients, which breaks differential privacy. Pass the bare model: "
            "fastdp detects the process group itself, clips each rank's samples and all-reduces "
            "the clipped sums once per logical step."
        )


def check_model(model: nn.Module) -> list[TieGroup]:
    """Refuse what fastdp cannot make private, naming the module and the fix; return the
    supported weight ties (Embeddings and at most one Linear head sharing their weight)."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    seen_modules: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        display = name or type(module).__name__
        if id(module) in seen_modules:
            own = any(p.requires_grad for p in module.parameters(recurse=False))
            if own and not can_merge(rule_for(module)):
                raise ValueError(
                    f"module '{display}' ({type(module).__qualname__}) is the same object as "
                    f"'{seen_modules[id(module)]}': a shared layer's per-sample gradient is the "
                    "sum over its uses, which fastdp combines before clipping for Linear, HF "
                    "Conv1D, Embedding and the norm layers, not for this one. Use separate "
                    "modules (or freeze the shared one)."
                )
            continue  # one layer under several names (T5's shared embedding): checked once
        seen_modules[id(module)] = display
        own = {k: p for k, p in module._parameters.items() if p is not None and p.requires_grad}
        for pname, param in own.items():
            owners.setdefault(id(param), []).append((display, module, pname))
        if not own:
            continue
        rule = rule_for(module)
        kind = type(module).__name__
        if rule is None:
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise ValueError(
                    f"module '{display}' ({kind}) mixes samples through batch statistics, so "
                    "per-sample gradients do not exist. Replace it with nn.GroupNorm (or "
                    "LayerNorm), e.g. nn.GroupNorm(min(32, C), C)."
                )
            why, fix = refusal(module) or ("has no per-sample rule", "freeze it")
            raise ValueError(
                f"module '{display}' ({type(module).__module__}.{type(module).__qualname__}) "
                f"has trainable parameters {sorted(own)} and {why}: {fix}."
            )
        if is_fallback(rule):  # every own parameter, by torch.func: warn when costly
            warn_fallback(display, module, model)
            continue
        if isinstance(module, nn.Embedding):
            _check_embedding(display, module)
        extra = set(own) - {"weight", "bias"}
        if extra:
            raise ValueError(
                f"module '{display}' ({kind}) has trainable parameters {sorted(extra)} that "
                f"the {kind} rule does not cover: freeze them or move them into a supported layer."
            )
    return check_tying(owners)


def _check_embedding(display: str, module: nn.Embedding) -> None:
    if module.sparse:
        raise ValueError(
            f"module '{display}' (Embedding) has sparse=True: fastdp accumulates dense clipped "
            "gradients; construct it with sparse=False."
        )
    if module.scale_grad_by_freq:
        raise ValueError(
            f"module '{display}' (Embedding) has scale_grad_by_freq=True, which couples samples "
            "through batch-wide token counts (no per-sample gradient): set it to False."
        )


def _optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    model_params = {id(p) for p in model.parameters() if p.requires_grad}
    params = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if id(p) not in model_params:
                raise ValueError(
                    "the optimizer holds a trainable parameter that is not in the module: "
                    "build the optimizer from module.parameters()."
                )
            params.append(p)
    if not params:
        raise ValueError("the optimizer has no trainable parameters of the module")
    return params


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shared_secret(seed: int | None, world_size: int) -> int:
    """The run's 128-bit secret, which keys all its noise and sampling: from OS entropy for
    ``seed=None``, else ``derive_secret(seed)``; with several ranks, rank 0's for all."""
    secret = secrets.randbits(128) if seed is None else derive_secret(seed)
    if world_size > 1:
        box = [secret]
        dist.broadcast_object_list(box, src=0)
        if seed is not None and box[0] != secret:
            warnings.warn("ranks passed different seeds; rank 0's seed is used", stacklevel=3)
        secret = box[0]
    return int(secret)
