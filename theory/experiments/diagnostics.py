"""Does the added noise matter at these batch sizes? Compare the two noises per step.

For a mini-batch of B samples the SGD gradient has covariance Sigma / B, with Sigma the
per-sample gradient covariance, so its total variance is tr(Sigma) / B. The added Gaussian
noise of Noisy-SGD / DP-SGD on the averaged gradient is N(0, (sigma C / B)^2 I), total variance
d (sigma / B)^2 (C = 1), which at fixed sigma/B does not change with B. Their ratio

    isotropic / SGD = d (sigma/B)^2 / (tr(Sigma) / B)

grows linearly with B: below ~1 the structured SGD noise dominates, above it the isotropic
noise does. ``gradient_noise`` measures tr(Sigma) at the initialisation (the run's seed-0
model) from per-sample gradients (torch.func, in chunks); the sweep prints the ratio for
every B and writes it to noise.json before training, so the noise level is known up front.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from fastdp.theory.experiments.data import collate


def gradient_noise(
    build_model: Callable[[], nn.Module],
    dataset: Dataset,
    *,
    samples: int = 512,
    chunk: int = 64,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    device: str = "cpu",
) -> dict[str, float]:
    """tr(Sigma) of raw and of clipped (to ``max_grad_norm``, as DP-SGD) per-sample gradients,
    the mean per-sample gradient norm, ||mean gradient|| and d, at the initialisation."""
    torch.manual_seed(seed)
    model = build_model().to(device)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    dim = sum(p.numel() for p in params.values())

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    count = min(samples, len(dataset))
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    clipped_total = torch.zeros_like(total)
    square_sum, norm_sum, clipped_square_sum = 0.0, 0.0, 0.0
    for start in range(0, count, chunk):
        x, y = collate(dataset.__getitems__(list(range(start, min(start + chunk, count)))))
        grads = per_sample(params, x.to(device), y.to(device))
        flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], 1).double()
        norms = flat.norm(dim=1)
        clipped = flat * (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)[:, None]
        total += flat.sum(0)
        clipped_total += clipped.sum(0)
        square_sum += float((norms**2).sum())
        clipped_square_sum += float((clipped**2).sum())
        norm_sum += float(norms.sum())
    unbias = count / max(count - 1, 1)
    mean, clipped_mean = total / count, clipped_total / count
    return {
        "trace_sigma": (square_sum / count - float(mean @ mean)) * unbias,
        "trace_sigma_clipped": (clipped_square_sum / count - float(clipped_mean @ clipped_mean))
        * unbias,
        "mean_sample_norm": norm_sum / count,
        "mean_gradient_norm": float(mean.norm()),
        "dim": float(dim),
        "samples": float(count),
    }


def noise_ratios(
    noise: dict[str, float], noise_ratio: float, batch_sizes: list[int], clipped: bool = False
) -> dict[int, float]:
    """B -> d (sigma/B)^2 / (tr(Sigma)/B): isotropic over SGD noise at the init (with the
    clipped gradients' Sigma, as DP-SGD sees it, when ``clipped``)."""
    iso = noise["dim"] * noise_ratio**2
    trace = noise["trace_sigma_clipped" if clipped else "trace_sigma"]
    return {int(b): iso / (trace / b) for b in sorted(batch_sizes)}
