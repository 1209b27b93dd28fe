"""MNIST-1D generated offline by the ``mnist1d`` package (no download, ever).

MNIST-1D (Greydanus, 2020) is a procedurally generated 1-D digit benchmark: 40-sample
signals, 10 classes. ``make_mnist1d`` calls the package's generator with its default
arguments except ``num_samples`` and ``seed``; the split is the package's own (80/20).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import TensorDataset


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, seed: int) -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    return make_dataset(args)


def make_mnist1d(num_samples: int = 5000, seed: int = 42) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) TensorDatasets of float32 signals (B, 40) and int64 labels.

    Signals are standardised with the training set's mean and std.
    """
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10, got {num_samples}")
    data = _generate(int(num_samples), int(seed))
    x_train = np.asarray(data["x"], dtype=np.float32)
    x_test = np.asarray(data["x_test"], dtype=np.float32)
    mean, std = x_train.mean(), x_train.std() + 1e-8
    train = TensorDataset(
        torch.from_numpy((x_train - mean) / std), torch.as_tensor(data["y"], dtype=torch.int64)
    )
    test = TensorDataset(
        torch.from_numpy((x_test - mean) / std), torch.as_tensor(data["y_test"], dtype=torch.int64)
    )
    return train, test


class MNIST1DAugment:
    """Random augmentations of MNIST-1D signals, for ``make_private(augment=...)``.

    Each row (view) of the signal tensor gets, independently: a circular shift by an integer
    in [-max_shift, max_shift], an amplitude scale in [1 - scale, 1 + scale] and additive
    Gaussian noise of std ``noise``. Called on a batch ``(x, y)`` (or a bare tensor), it
    transforms ``x`` (N, L) and passes the rest through. The draws come from the object's own
    generator (``seed``), so an experiment is reproducible; they depend on no other sample,
    so a sample's K views, and its gradient, are still a function of that sample alone.
    """

    def __init__(
        self, max_shift: int = 4, scale: float = 0.1, noise: float = 0.05, seed: int = 0
    ) -> None:
        if max_shift < 0 or scale < 0 or noise < 0:
            raise ValueError("max_shift, scale and noise must be >= 0")
        self.max_shift, self.scale, self.noise = int(max_shift), float(scale), float(noise)
        self.generator = torch.Generator().manual_seed(int(seed))

    def signals(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ..., L) -> (N, ..., L) augmented copies (one draw per row)."""
        rows, length = x.shape[0], x.shape[-1]
        per_row = (rows,) + (1,) * (x.dim() - 1)
        g = self.generator
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (rows, 1), generator=g)
        index = (torch.arange(length).unsqueeze(0) - shift) % length
        out = x.gather(-1, index.view(rows, *per_row[1:-1], length).expand_as(x).to(x.device))
        gain = 1 + self.scale * (2 * torch.rand(per_row, generator=g) - 1)
        out = out * gain.to(x)
        if self.noise:
            out = out + self.noise * torch.randn(out.shape, generator=g).to(x)
        return out

    def __call__(self, batch):
        if isinstance(batch, torch.Tensor):
            return self.signals(batch)
        x, *rest = batch
        return type(batch)([self.signals(x), *rest])
