"""Logical batches (Poisson or fixed) delivered as memory-bounded physical micro-batches.

The sample set of logical step t is a pure function of (seed, t), ``seed`` being the run's
128-bit secret: Poisson sampling draws the gaps between selected indices from a geometric law
(exactly i.i.d. Bernoulli(q) membership, O(qN) work per step rather than O(N)) from Philox
stream ``SAMPLING_STREAM``; fixed batches come from a per-epoch permutation (the argsort of
Philox uniforms of stream ``SHUFFLE_STREAM`` at counter ``epoch``). The sample set stays as
secret as the noise, which the amplification by sampling assumes (see kernels/noise.py). The
loader's position is the optimizer's logical step counter, so a run restored from a
checkpoint continues with the very batches the uninterrupted run would see.
With torch.distributed every rank draws the same global sample set and keeps its own share
(index % world_size == rank), so the union over ranks is the single-process batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)
from torch.utils.data._utils.collate import default_collate

from fastdp.kernels.noise import SAMPLING_STREAM, SHUFFLE_STREAM, philox_uniform64


def poisson_indices(num_samples: int, sample_rate: float, seed: int, step: int) -> torch.Tensor:
    """Sorted int64 indices in [0, num_samples), each present independently with prob q.

    Gaps between successive selected indices are i.i.d. Geometric(q) on {1, 2, ...}, drawn as
    1 + floor(log(1 - U) / log(1 - q)) from Philox uniforms U in [0, 1); equivalent to a
    Bernoulli(q) coin per index.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate == 1.0:
        return torch.arange(num_samples)
    log_keep = math.log1p(-sample_rate)
    expected = num_samples * sample_rate
    chunk = int(expected + 6 * math.sqrt(expected + 1) + 16)
    picked, position, drawn = [], -1, 0
    while position < num_samples:
        u = philox_uniform64(chunk, seed, step, SAMPLING_STREAM, offset=drawn)
        drawn += chunk
        gaps = 1 + torch.floor(torch.log1p(-u) / log_keep).to(torch.int64)
        positions = position + torch.cumsum(gaps, 0)
        picked.append(positions[positions < num_samples])
        position = int(positions[-1])
    return torch.cat(picked)


def steps_per_epoch(num_samples: int, batch_size: int, poisson: bool, drop_last: bool) -> int:
    """Logical steps in one epoch: round(1/q) under Poisson sampling, else the batches."""
    if poisson:
        return max(1, round(num_samples / min(batch_size, num_samples)))
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest and not drop_last else 0)


def fixed_batches(
    num_samples: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int, epoch: int
) -> list[torch.Tensor]:
    """The logical batches of one epoch without Poisson sampling (the loader's batches)."""
    if shuffle:
        keys = philox_uniform64(num_samples, seed, epoch, SHUFFLE_STREAM)
        order = torch.argsort(keys, stable=True)
    else:
        order = torch.arange(num_samples)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class _EmptyAwareCollate:
    """The user's collate_fn, plus a correctly shaped empty batch for an empty index list."""

    def __init__(self, dataset: Dataset, collate_fn) -> None:
        self.dataset, self.collate_fn = dataset, collate_fn or default_collate

    def __call__(self, samples: list):
        if samples:
            return self.collate_fn(samples)
        template = self.collate_fn([self.dataset[0]])
        return _take_none(template)


def _take_none(batch):
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take_none(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _take_none(v) for k, v in batch.items()}
    raise TypeError(f"cannot build an empty batch from a collated {type(batch).__name__}")


def _repeat_rows(batch, n_samples: int, views: int):
    """Tensors with ``n_samples`` leading rows repeated ``views`` times each (repeat_interleave);
    anything else (broadcast tensors, strings, numbers) as it is."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() and batch.shape[0] == n_samples:
            return batch.repeat_interleave(views, dim=0)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_repeat_rows(b, n_samples, views) for b in batch)
    if isinstance(batch, dict):
        return {k: _repeat_rows(v, n_samples, views) for k, v in batch.items()}
    return batch


def _augment_per_sample(augment: Callable, batch, n_samples: int, views: int):
    """``augment`` called on each sample's ``views`` rows separately, the results stacked in
    order: whatever the transform does, a sample's views depend on that sample alone."""
    rows = n_samples * views
    parts = [
        augment(_rows(batch, rows, slice(i * views, (i + 1) * views))) for i in range(n_samples)
    ]
    return _stack(parts, views)


def _rows(batch, rows: int, span: slice):
    if isinstance(batch, torch.Tensor):
        return batch[span] if batch.dim() and batch.shape[0] == rows else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_rows(b, rows, span) for b in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, rows, span) for k, v in batch.items()}
    return batch


def _stack(parts: list, views: int):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() and first.shape[0] == views:
            return torch.cat(parts)
        return first
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([p[k] for p in parts], views) for k in range(len(first)))
    if isinstance(first, dict):
        return {k: _stack([p[k] for p in parts], views) for k in first}
    return first


class DPDataLoader:
    """Yields physical micro-batches of logical batches and tells the optimizer which
    micro-batch closes each logical batch (``optimizer.signal_micro_batch``)."""

    def __init__(
        self,
        data_loader: DataLoader,
        *,
        poisson_sampling: bool,
        max_physical_batch_size: int | None,
        rank: int = 0,
        augment: Callable | None = None,
    ) -> None:
        dataset = data_loader.dataset
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(
                "make_private needs a map-style dataset (with __len__ and __getitem__) to "
                "sample logical batches; an IterableDataset cannot be Poisson-sampled."
            )
        batch_size = data_loader.batch_size
        if batch_size is None:
            batch_size = getattr(data_loader.batch_sampler, "batch_size", None)
        if not batch_size:
            raise ValueError(
                "the data loader has no batch_size: build it with DataLoader(dataset, "
                "batch_size=<logical batch size>) so the sample rate q = batch_size / N is known."
            )
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        self.original = data_loader
        self.dataset = dataset
        self.optimizer = None  # the DPOptimizer this loader drives (``drive``)
        self.num_samples = len(dataset)
        if self.num_samples == 0:
            raise ValueError("the data loader's dataset is empty")
        self.batch_size = int(batch_size)
        self.sample_rate = min(1.0, self.batch_size / self.num_samples)
        self.poisson_sampling = poisson_sampling
        if not isinstance(data_loader.sampler, (RandomSampler, SequentialSampler)):
            raise ValueError(
                f"the data loader's sampler is a {type(data_loader.sampler).__name__}: fastdp "
                "draws its own logical batches (Poisson or shuffled) over the whole dataset and "
                "would ignore it. Pass a loader over the dataset you mean to train on (e.g. a "
                "torch.utils.data.Subset) with shuffle=True/False and no custom sampler."
            )
        self.shuffle = isinstance(data_loader.sampler, RandomSampler)
        self.drop_last = bool(data_loader.drop_last)
        self.max_physical_batch_size = max_physical_batch_size
        self.rank = rank
        self.augment = augment
        self.collate = _EmptyAwareCollate(dataset, data_loader.collate_fn)
        self._epoch_cache: tuple[int, list[torch.Tensor]] | None = None
        self._plan_cache: tuple[tuple[int, int], list] | None = None

    @property
    def batch_sampler(self):
        """Refused with the fastdp way (Opacus's BatchMemoryManager reads it)."""
        from fastdp.habits import refuse_batch_sampler

        refuse_batch_sampler()

    def drive(self, optimizer) -> None:
        """Signal micro-batches to ``optimizer`` and read the run's secret and step from it."""
        self.optimizer = optimizer

    @property
    def seed(self) -> int:
        """The run's sampling secret (owned by the optimizer's ``run``)."""
        return self.optimizer.run.secret

    @property
    def world_size(self) -> int:
        return self.optimizer.run.world_size

    @property
    def views(self) -> int:
        """Augmentation multiplicity K: each sample is yielded as K consecutive rows."""
        return self.optimizer.run.views

    def with_views(self, batch, n_samples: int):
        """Every tensor of ``batch`` with ``n_samples`` rows repeated K times, grouped by sample
        (row i*K + k is view k of sample i), then ``augment`` applied to each sample's K rows
        on their own (a batch-level transform such as mixup would mix samples)."""
        views = self.views
        if views > 1:
            batch = _repeat_rows(batch, n_samples, views)
        if self.augment is not None and n_samples:
            batch = _augment_per_sample(self.augment, batch, n_samples, views)
        return batch

    @property
    def expected_batch_size(self) -> float:
        """The normaliser of the noisy mean: q * N (Poisson) or the fixed logical batch."""
        if self.poisson_sampling:
            return self.sample_rate * self.num_samples
        return float(self.batch_size)

    @property
    def logical_steps_per_epoch(self) -> int:
        return steps_per_epoch(
            self.num_samples, self.batch_size, self.poisson_sampling, self.drop_last
        )

    def logical_batch(self, step: int) -> torch.Tensor:
        """Global indices of logical step ``step`` (all ranks)."""
        if self.poisson_sampling:
            return poisson_indices(self.num_samples, self.sample_rate, self.seed, step)
        epoch, position = divmod(step, self.logical_steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != (epoch, self.seed):
            batches = fixed_batches(
                self.num_samples, self.batch_size, self.shuffle, self.drop_last, self.seed, epoch
            )
            self._epoch_cache = ((epoch, self.seed), batches)
        return self._epoch_cache[1][position]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's share of logical step ``step``, split into physical micro-batches."""
        indices = self.logical_batch(step)
        if self.world_size > 1:
            indices = indices[indices % self.world_size == self.rank]
        size = self.max_physical_batch_size or max(len(indices), 1)
        chunks = [c.tolist() for c in indices.split(size)] if len(indices) else []
        return chunks or [[]]  # an empty logical batch still closes with one (empty) step

    def _fetch(self, chunks: list[list[int]]) -> Iterator:
        """Batches for the index lists: direct tensor indexing for an in-memory
        TensorDataset with the default collate, else a DataLoader with the user's settings."""
        original = self.original
        if (
            isinstance(self.dataset, TensorDataset)
            and original.num_workers == 0
            and original.collate_fn is default_collate
        ):
            tensors = self.dataset.tensors
            return ([t[torch.as_tensor(c, dtype=torch.long)] for t in tensors] for c in chunks)
        loader = DataLoader(
            self.dataset,
            batch_sampler=chunks,
            collate_fn=self.collate,
            num_workers=original.num_workers,
            pin_memory=original.pin_memory,
        )
        return iter(loader)

    def _plan(self) -> list[tuple[int, list[list[int]]]]:
        """(step, micro-batches) for the remaining logical steps of the current epoch."""
        steps = self.logical_steps_per_epoch
        start = self.optimizer.logical_step
        key = (start, self.seed)
        if self._plan_cache is None or self._plan_cache[0] != key:
            stop = (start // steps + 1) * steps
            self._plan_cache = (key, [(t, self.micro_batches(t)) for t in range(start, stop)])
        return self._plan_cache[1]

    def __len__(self) -> int:
        """Number of micro-batches the next iteration yields (the rest of this epoch)."""
        return sum(len(chunks) for _, chunks in self._plan())

    def __iter__(self) -> Iterator:
        """The remaining logical batches of the current epoch, as micro-batches."""
        if self.optimizer.mid_logical_batch():
            raise RuntimeError(
                "the previous iteration stopped inside a logical batch whose clipped sums are "
                "still pending; iterating again would add its first micro-batches twice. Call "
                "optimizer.discard_logical_batch() first (or finish the logical batch)."
            )
        plan = self._plan()
        self._plan_cache = None
        batches = self._fetch([chunk for _, chunks in plan for chunk in chunks])
        try:
            for t, chunks in plan:
                for j in range(len(chunks)):
                    if self.optimizer.logical_step != t:
                        raise RuntimeError(
                            f"logical step {t} expected, but the optimizer is at "
                            f"{self.optimizer.logical_step}: call optimizer.step() exactly once "
                            "after every micro-batch the private loader yields."
                        )
                    n_samples = len(chunks[j])
                    batch = self.with_views(next(batches), n_samples)
                    is_last = j == len(chunks) - 1
                    self.optimizer.signal_micro_batch(is_last=is_last, size=n_samples * self.views)
                    yield batch
        finally:
            # the loop left (break, a peek with next(iter(loader)), an exception): a signal
            # its step() did not consume must not make a later step on other data count as
            # drawn by this loader
            self.optimizer.signal_micro_batch(is_last=None, size=None)
