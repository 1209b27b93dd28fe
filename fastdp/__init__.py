"""fastdp: differentially private training (DP-SGD, Noisy-SGD) as fast as ordinary training.

engine = fastdp.PrivacyEngine(accountant="prv")
model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
    data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
"""

from fastdp.engine import PrivacyEngine
from fastdp.optimizer import DPOptimizer

__version__ = "0.1.0"
__all__ = ["PrivacyEngine", "DPOptimizer", "DPSGD", "DPAdamW", "__version__"]


def __getattr__(name: str):
    # The fused optimizers live with the kernels' launchers; import them on first use.
    if name in ("DPSGD", "DPAdamW"):
        from fastdp import optimizers

        return getattr(optimizers, name)
    raise AttributeError(f"module 'fastdp' has no attribute {name!r}")
