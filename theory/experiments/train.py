"""One run of the protocol, trained with fastdp's own PrivacyEngine and DPOptimizer.

``sgd`` also goes through the library (clipping="none", sigma = 0): the same Poisson
sampling, loss normalisation (by the expected batch q * N) and update code as the noisy runs,
so the three algorithms differ only in clipping and noise.

Privacy accounting: epsilon at delta = 1/N_train comes from the engine. The engine uses the
PRV accountant when sigma >= PRV_MIN_SIGMA and RDP below: Opacus's PRV accountant tries
to allocate tens of GiB for sigma ~ 0.03-0.06 (MemoryError) and takes about a minute at
sigma = 0.13, while RDP is instantaneous and only looser. The ``accountant`` column says which.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fastdp
from fastdp.datasets import MNIST1DAugment
from fastdp.theory.experiments.data import collate
from fastdp.theory.experiments.protocol import RunSpec

PRV_MIN_SIGMA = 0.3
TRAIN_LOSS_SAMPLES = 10_000  # the final training loss is measured on this many samples
EVAL_BATCH = 2048


@dataclass
class RunResult:
    """What one run reports (``curve``: (step, test accuracy, EMA test accuracy or nan))."""

    test_accuracy: float
    train_loss: float
    epsilon: float
    accountant: str
    wall_seconds: float
    ema_test_accuracy: float = math.nan
    curve: list[tuple[int, float, float]] = field(default_factory=list)


class WeightEMA:
    """Exponential moving average of the parameters with the usual warm-up,
    decay_t = min(decay, (1 + t) / (10 + t)), so short runs are not dominated by the init."""

    def __init__(self, params: list[torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for p, s in zip(self.params, self.shadow):
            live = p.detach().clone()
            p.copy_(s)
            s.copy_(live)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, device: str, limit: int | None = None
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the first ``limit`` samples of ``dataset``."""
    was_training = model.training
    model.eval()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    correct, loss_sum = 0, 0.0
    for start in range(0, count, EVAL_BATCH):
        x, y = collate(dataset.__getitems__(list(range(start, min(start + EVAL_BATCH, count)))))
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(count, 1), loss_sum / max(count, 1)


def train_run(
    spec: RunSpec,
    train: Dataset,
    test: Dataset,
    build_model: Callable[[], nn.Module],
    *,
    device: str = "cpu",
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``spec.steps`` logical steps with fastdp and evaluate; deterministic in the seed."""
    start = time.perf_counter()
    cfg = spec.config
    torch.manual_seed(spec.seed)
    model = build_model().to(device)
    base = torch.optim.SGD(model.parameters(), lr=spec.lr_at(0), momentum=cfg.momentum)
    engine = fastdp.PrivacyEngine(accountant="prv" if spec.sigma >= PRV_MIN_SIGMA else "rdp")
    fix = spec.fix
    augment = MNIST1DAugment(seed=spec.seed) if fix.augment else None
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=base,
        data_loader=DataLoader(train, batch_size=spec.batch_size, collate_fn=collate),
        noise_multiplier=spec.sigma,
        max_grad_norm=cfg.max_grad_norm if spec.clipping == "flat" else 1.0,
        clipping=spec.clipping,
        poisson_sampling=True,
        max_physical_batch_size=cfg.max_physical_batch_size,
        seed=spec.seed,
        augmentation_multiplicity=fix.views,
        augment=augment,
    )
    ema = WeightEMA(optimizer.params, cfg.ema) if cfg.ema > 0 else None
    checkpoints = set(spec.eval_steps())
    curve: list[tuple[int, float, float]] = []
    while optimizer.logical_step < spec.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if not optimizer.last_step_updated:
                continue
            step = optimizer.logical_step
            if ema is not None:
                ema.update()
            for group in optimizer.param_groups:
                group["lr"] = spec.lr_at(step)
            if step in checkpoints:
                curve.append((step, *_accuracies(model, test, device, ema)))
            if on_step is not None:
                on_step(step)
            if step >= spec.steps:
                break
    _, train_loss = evaluate(model, train, device, limit=TRAIN_LOSS_SAMPLES)
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" at tiny sigma
        warnings.simplefilter("ignore", UserWarning)
        epsilon = engine.get_epsilon(delta=1.0 / len(train))
    final_acc, final_ema = curve[-1][1], curve[-1][2]
    return RunResult(
        test_accuracy=final_acc,
        train_loss=train_loss,
        epsilon=epsilon,
        accountant=engine.accountant_name,
        wall_seconds=time.perf_counter() - start,
        ema_test_accuracy=final_ema,
        curve=curve,
    )


def _accuracies(
    model: nn.Module, test: Dataset, device: str, ema: WeightEMA | None
) -> tuple[float, float]:
    accuracy, _ = evaluate(model, test, device)
    if ema is None:
        return accuracy, math.nan
    ema.swap()
    try:
        ema_accuracy, _ = evaluate(model, test, device)
    finally:
        ema.swap()
    return accuracy, ema_accuracy
