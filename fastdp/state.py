"""The one owner of a private run's settings and position.

Everything the privacy guarantee depends on is decided once, in ``make_private``, and kept
here: the clipping strategy (mode, thresholds, sensitivity), sigma, the sample rate and the
dataset size, the expected logical batch, the loss reduction, the world size, the accountant
and the noise secret; and where the run is: the logical step and the micro-batch inside it.
The optimizer, the private loader, the checkpoint and the accountant all read this object
instead of keeping copies of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastdp.clipping import ClippingStrategy


@dataclass
class PrivateRun:
    strategy: ClippingStrategy
    noise_multiplier: float
    sample_rate: float
    num_samples: int
    expected_batch_size: float
    poisson_sampling: bool
    loss_reduction: str
    world_size: int
    accountant: str
    secret: int  # the 128-bit key of every noise and sampling draw (see kernels/noise.py)
    views: int = 1  # augmentation multiplicity K: a sample's gradient is the mean of K views
    logical_step: int = 0
    micro_step: int = 0  # micro-batches of the unfinished logical batch

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the clipped sum: sigma * C."""
        return self.noise_multiplier * self.strategy.sensitivity

    def facts(self) -> dict:
        """What a checkpoint records and a resumed run must match (the secret and the
        position are restored, not compared)."""
        thresholds = getattr(self.strategy, "thresholds", None)
        return {
            "clipping": self.strategy.mode,
            "max_grad_norm": self.strategy.sensitivity,
            "per_layer_thresholds": dict(thresholds) if thresholds is not None else None,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "num_samples": self.num_samples,
            "poisson_sampling": self.poisson_sampling,
            "loss_reduction": self.loss_reduction,
            "world_size": self.world_size,
            "accountant": self.accountant,
        }
