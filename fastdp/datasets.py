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
