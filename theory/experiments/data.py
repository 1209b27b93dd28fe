"""Datasets and models of the sweeps: MNIST-1D (cached offline generation), CIFAR-10 (local).

MNIST-1D comes from ``fastdp.datasets.make_mnist1d`` (the ``mnist1d`` package's generator
with its default arguments except ``num_samples`` and ``seed``; 80/20 train/test split;
signals standardised with the training mean and std). Generating 50,000 samples takes about
30 s on two cores, so the standardised arrays are cached in
``<cache_dir>/mnist1d_n<num_samples>_seed<seed>.npz`` (default cache_dir
``~/.cache/fastdp``, or ``$FASTDP_CACHE``); delete the file to regenerate.

``ArrayDataset`` fetches a whole micro-batch with one indexing operation (``__getitems__``,
which torch's DataLoader uses when present) instead of B ``__getitem__`` calls and a stack.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from fastdp.models import Conv1dNet, WideResNet, mlp

DATASETS = ("mnist1d", "cifar10")
MODELS = {"mnist1d": ("mlp", "conv1d"), "cifar10": ("wrn16_4",)}


class Batch(tuple):
    """A micro-batch already collated by ``ArrayDataset.__getitems__``."""


class ArrayDataset(Dataset):
    """(inputs, labels) tensors with batched fetching; pair with ``collate``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return Batch((self.inputs[index], self.labels[index]))


def collate(samples):
    """Pass batches from ``ArrayDataset.__getitems__`` through; collate anything else."""
    if isinstance(samples, Batch):
        return tuple(samples)
    return default_collate(samples)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTDP_CACHE", Path.home() / ".cache" / "fastdp"))


def mnist1d_arrays(num_samples: int, seed: int, cache_dir: str | Path | None = None) -> dict:
    """Standardised MNIST-1D arrays (x, y, x_test, y_test), generated once and cached."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"mnist1d_n{int(num_samples)}_seed{int(seed)}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return {k: cached[k] for k in ("x", "y", "x_test", "y_test")}
    from fastdp.datasets import make_mnist1d

    train, test = make_mnist1d(num_samples=int(num_samples), seed=int(seed))
    arrays = {
        "x": train.tensors[0].numpy(),
        "y": train.tensors[1].numpy(),
        "x_test": test.tensors[0].numpy(),
        "y_test": test.tensors[1].numpy(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
    return arrays


def load_dataset(
    name: str,
    *,
    num_samples: int = 50_000,
    data_seed: int = 42,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) for ``name`` in DATASETS; CIFAR-10 needs ``data_dir``."""
    if name == "mnist1d":
        arrays = mnist1d_arrays(num_samples, data_seed, cache_dir)
        x, y, x_test, y_test = (arrays[k] for k in ("x", "y", "x_test", "y_test"))
    elif name == "cifar10":
        from fastdp.theory.experiments.cifar10 import load_cifar10

        if data_dir is None:
            raise FileNotFoundError(
                "--dataset cifar10 needs --data-dir DIR: the folder with CIFAR-10's python "
                "batches (data_batch_1..5, test_batch, as extracted from cifar-10-python.tar.gz "
                "of https://www.cs.toronto.edu/~kriz/cifar.html); nothing is downloaded."
            )
        x, y, x_test, y_test = load_cifar10(data_dir)
    else:
        raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    return (
        ArrayDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y).long()),
        ArrayDataset(torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test).long()),
    )


def model_factory(dataset: str, model: str | None = None) -> tuple[str, Callable[[], nn.Module]]:
    """(model name, constructor) from fastdp.models; the dataset's first model by default."""
    if dataset not in MODELS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    model = model or MODELS[dataset][0]
    if model not in MODELS[dataset]:
        raise ValueError(f"model {model!r} is not for {dataset}; use {', '.join(MODELS[dataset])}")
    builders: dict[str, Callable[[], nn.Module]] = {
        "mlp": lambda: mlp(in_features=40, hidden=256, depth=2, classes=10),
        "conv1d": lambda: Conv1dNet(length=40, channels=32, classes=10),
        "wrn16_4": lambda: WideResNet(depth=16, width=4, classes=10),
    }
    return model, builders[model]
