"""The sweep protocol: fixed steps S, fixed effective noise sigma/B, a sweep over B.

One ``SweepConfig`` expands into ``RunSpec``s, one per (seed, batch size, algorithm):

- ``sgd``:       clipping="none", sigma = 0 (no noise, no clipping);
- ``noisy_sgd``: clipping="none", sigma = noise_ratio * B (noise std sigma on the gradient sum);
- ``dp_sgd``:    clipping="flat" with C = max_grad_norm (1), the same sigma.

All three go through the same fastdp path (PrivacyEngine, Poisson sampling at q = B/N,
DPOptimizer), so a seed gives the same initialisation and the same sampled batches to every
algorithm, and the three differ only in clipping and noise. Every run of a sweep has the same
S, the same learning rate schedule and the same sigma/B; nothing is tuned per batch size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ALGORITHMS = ("sgd", "noisy_sgd", "dp_sgd")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Remedy:
    """A change to a run at large B that keeps sigma/B, S and the sampled samples (issue 13).

    ``views`` K > 1: augmentation multiplicity (De et al. 2022), each sample's gradient the
    mean over K augmented views (``make_private(augmentation_multiplicity=K)``); ``augment``:
    MNIST-1D augmentations (shift, scale, noise) on every view; ``lr_scaling``: the lr
    multiplied by B / B_ref ("linear", Goyal et al. 2017) or sqrt(B / B_ref) ("sqrt",
    Krizhevsky 2014, Hoffer et al. 2017), B_ref = ``SweepConfig.lr_ref_batch``; ``warmup``:
    linear warm-up over that fraction of S.
    """

    views: int = 1
    augment: bool = False
    lr_scaling: str = "none"
    warmup: float = 0.0


REMEDIES = {
    "baseline": Remedy(),
    "augment": Remedy(augment=True),  # the control: augmentation alone, one view
    "mult4": Remedy(views=4, augment=True),
    "mult8": Remedy(views=8, augment=True),
    "lr_linear_warmup": Remedy(lr_scaling="linear", warmup=0.1),
    "lr_sqrt": Remedy(lr_scaling="sqrt"),
}

# Defaults of the full CPU sweep (see README.md for why these values).
DEFAULT_BATCH_SIZES = (32, 64, 128, 256, 512, 1024)
DEFAULT_NOISE_RATIO = 8e-4
# `fastdp experiment remedies`: the remedies at the two ends of the paper's range.
REMEDY_DEFAULTS = {
    "batch_sizes": (128, 1024),
    "algorithms": ("sgd", "noisy_sgd"),
    "remedies": tuple(REMEDIES),
}
# --quick: the same protocol at a size that runs in a few minutes on two shared cores.
QUICK = {
    "num_samples": 10_000,
    "batch_sizes": (16, 64, 256),
    "steps": 300,
    "seeds": 2,
    "eval_points": 5,
}


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep; ``runs()`` lists its runs."""

    dataset: str = "mnist1d"
    model: str | None = None  # the dataset's default model when None
    num_samples: int = 50_000  # MNIST-1D samples generated (80% train)
    data_seed: int = 42
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    steps: int = 1000
    noise_ratio: float = DEFAULT_NOISE_RATIO  # sigma / B, the same for every B
    seeds: int = 3
    lr: float = 0.5  # the paper's ImageNet value; best of {0.1, 0.2, 0.5} for sgd at B = 128
    momentum: float = 0.0
    schedule: str = "constant"
    ema: float = 0.0  # EMA decay of the weights (0 = off; the paper uses 0.999)
    max_grad_norm: float = 1.0
    algorithms: tuple[str, ...] = ALGORITHMS
    eval_points: int = 10
    max_physical_batch_size: int = 256
    remedies: tuple[str, ...] = ("baseline",)
    lr_ref_batch: int = 128  # B_ref of the remedies' lr scaling
    lrs: tuple[tuple[str, float], ...] = ()  # per-algorithm lr (tuned), else ``lr``
    validation: int = 0  # > 0: hold out the last N training samples and test on them

    def __post_init__(self) -> None:
        unknown_remedies = set(self.remedies) - set(REMEDIES)
        if unknown_remedies:
            raise ValueError(
                f"unknown remedies {sorted(unknown_remedies)}; use {', '.join(REMEDIES)}"
            )
        if self.validation < 0:
            raise ValueError(f"validation must be >= 0, got {self.validation}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.steps < 1 or self.seeds < 1:
            raise ValueError("steps and seeds must be >= 1")
        if not (math.isfinite(self.noise_ratio) and self.noise_ratio >= 0):
            raise ValueError(f"noise_ratio must be a finite number >= 0, got {self.noise_ratio}")
        unknown = set(self.algorithms) - set(ALGORITHMS)
        if unknown:
            raise ValueError(f"unknown algorithms {sorted(unknown)}; use {', '.join(ALGORITHMS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")

    def replace(self, **changes) -> SweepConfig:
        return dataclasses.replace(self, **changes)

    def sigma(self, algorithm: str, batch_size: int) -> float:
        """Noise multiplier of one run: 0 for sgd, noise_ratio * B otherwise."""
        return 0.0 if algorithm == "sgd" else self.noise_ratio * batch_size

    def lr_for(self, algorithm: str) -> float:
        return dict(self.lrs).get(algorithm, self.lr)

    def runs(self) -> list[RunSpec]:
        """Seed-major order, so an interrupted sweep already covers every B for seed 0."""
        return [
            RunSpec(
                algorithm=algorithm,
                batch_size=int(batch),
                sigma=self.sigma(algorithm, int(batch)),
                steps=self.steps,
                seed=seed,
                lr=self.lr_for(algorithm),
                config=self,
                remedy=remedy,
            )
            for seed in range(self.seeds)
            for batch in sorted(self.batch_sizes)
            for remedy in self.remedies
            for algorithm in self.algorithms
        ]


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep."""

    algorithm: str
    batch_size: int
    sigma: float
    steps: int
    seed: int
    lr: float
    config: SweepConfig
    remedy: str = "baseline"

    @property
    def clipping(self) -> str:
        return "flat" if self.algorithm == "dp_sgd" else "none"

    @property
    def fix(self) -> Remedy:
        return REMEDIES[self.remedy]

    @property
    def label(self) -> str:
        """algorithm, or algorithm+remedy: the row label of the reports."""
        return self.algorithm if self.remedy == "baseline" else f"{self.algorithm}+{self.remedy}"

    def lr_at(self, step: int) -> float:
        """Learning rate of logical step ``step`` (0-based): identical for every B unless the
        remedy scales it with B (and warms it up)."""
        fix = self.fix
        ratio = self.batch_size / self.config.lr_ref_batch
        scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[fix.lr_scaling]
        if fix.warmup > 0:
            scale *= min(1.0, (step + 1) / max(1.0, fix.warmup * self.steps))
        if self.config.schedule == "cosine":
            return self.lr * scale * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr * scale

    def eval_steps(self) -> list[int]:
        """Logical steps after which the test accuracy is recorded (the last is S)."""
        points = max(1, min(self.config.eval_points, self.steps))
        return sorted({round(self.steps * k / points) for k in range(1, points + 1)})

    def key(self) -> tuple[str, ...]:
        """Identity in results.csv: a finished run with this key is not run again."""
        row = self.identity()
        return tuple(row[c] for c in KEY_COLUMNS)

    def identity(self) -> dict[str, str]:
        """The key columns of this run's results.csv row, formatted as written."""
        cfg = self.config
        return {
            "dataset": cfg.dataset,
            "model": cfg.model or "",
            "num_samples": fmt(cfg.num_samples),
            "data_seed": fmt(cfg.data_seed),
            "algorithm": self.algorithm,
            "batch_size": fmt(self.batch_size),
            "sigma": fmt(self.sigma),
            "steps": fmt(self.steps),
            "seed": fmt(self.seed),
            "lr": fmt(self.lr),
            "momentum": fmt(cfg.momentum),
            "schedule": cfg.schedule,
            "ema": fmt(cfg.ema),
            "max_grad_norm": fmt(cfg.max_grad_norm),
            # new columns, empty at their defaults so older results.csv keys still match
            "remedy": "" if self.remedy == "baseline" else self.remedy,
            "validation": fmt(cfg.validation) if cfg.validation else "",
        }


KEY_COLUMNS = (
    "dataset",
    "model",
    "num_samples",
    "data_seed",
    "algorithm",
    "batch_size",
    "sigma",
    "steps",
    "seed",
    "lr",
    "momentum",
    "schedule",
    "ema",
    "max_grad_norm",
    "remedy",
    "validation",
)


def fmt(value: float | int) -> str:
    """The one text form of numbers in results.csv (so keys compare as strings)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isinf(value):
        return "inf"
    return f"{value:.10g}"
