"""Batch selection: Poisson sampling of logical batches, and their split into physical chunks.

Poisson sampling includes every example in every step independently with probability q, which is the sampling
the accountant's amplification-by-subsampling analysis assumes. Batch sizes therefore vary, and can be zero: an
empty batch still yields a (zero-length) batch so that the step happens and its noise is added.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.dataloader import default_collate
from torch.utils._pytree import tree_flatten, tree_map

from dptrain.randomness import RandomSource


def sample_space(data_loader: DataLoader) -> torch.Tensor | None:
    """The dataset indices the user's loader draws from (its sampler's index set), or None for the whole dataset.

    Poisson sampling replaces the loader's batch selection, but not its choice of examples: a ``SubsetRandomSampler``
    (or any sampler over a subset, e.g. a train split) is honoured by sampling from its indices only, with N = their
    number. ``DistributedSampler`` stands for the whole dataset (the engine shards by rank itself). A sampler that
    repeats indices or weights them (``WeightedRandomSampler``, ``replacement=True``) cannot be turned into Poisson
    sampling of a set and is refused.
    """
    sampler = data_loader.sampler
    size = len(data_loader.dataset)
    if isinstance(data_loader.batch_sampler, PoissonBatchSampler):  # already Poisson (DPDataLoader.from_data_loader)
        shard = data_loader.batch_sampler.shard
        return None if len(shard) == size else shard
    if data_loader.batch_sampler is not None and not isinstance(data_loader.batch_sampler, BatchSampler):
        sampler = [i for batch in data_loader.batch_sampler for i in batch]  # a custom batch sampler's examples
    elif isinstance(sampler, (SequentialSampler, DistributedSampler)):
        return None
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == size:
        return None
    if isinstance(sampler, (WeightedRandomSampler, RandomSampler)):
        raise ValueError(
            f"the data loader's {type(sampler).__name__} draws examples with replacement or by weight, which Poisson "
            "sampling cannot honour (each example is included with the same probability): pass a loader over the "
            "examples to train on, without a custom sampler"
        )
    indices = torch.as_tensor(list(sampler.indices if isinstance(sampler, SubsetRandomSampler) else sampler))
    indices = indices.long().flatten()
    if len(indices) == 0:
        raise ValueError("the data loader's sampler yields no example: there is nothing to train on")
    if len(torch.unique(indices)) != len(indices):
        raise ValueError(
            f"the data loader's {type(sampler).__name__} repeats examples, which Poisson sampling cannot honour: "
            "give a sampler over a set of distinct indices (e.g. SubsetRandomSampler) or none"
        )
    if indices.min() < 0 or indices.max() >= size:
        raise ValueError(f"the data loader's sampler yields indices outside the dataset of {size} examples")
    return indices


class PoissonBatchSampler(Sampler[list[int]]):
    """``steps`` batches; each contains every index of ``range(num_samples)`` independently with prob ``sample_rate``.

    Under ``torch.distributed`` each of ``world_size`` ranks samples only its shard (indices congruent to ``rank``
    modulo ``world_size``) with the same rate and its own random stream, so the union over ranks is a Poisson sample
    of the whole dataset. With ``indices`` (a subset of a dataset, e.g. from :func:`sample_space`), position k of
    ``range(num_samples)`` stands for dataset index ``indices[k]``.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        random: RandomSource | None = None,
        rank: int = 0,
        world_size: int = 1,
        indices: torch.Tensor | None = None,
    ) -> None:
        if indices is not None and len(indices) != num_samples:
            raise ValueError(f"indices has {len(indices)} entries for num_samples={num_samples}")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps <= 0:
            raise ValueError(f"steps must be > 0, got {steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.random = random or RandomSource()
        self.shard = torch.arange(rank, num_samples, world_size)
        if indices is not None:
            self.shard = indices[self.shard]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            included = self.random.uniform(len(self.shard)) < self.sample_rate
            yield self.shard[included].tolist()


class UserPoissonBatchSampler(Sampler[list[int]]):
    """User-level Poisson sampling: each user is included with probability ``sample_rate``, with all its examples.

    ``user_ids[i]`` is the user of example i. Under ``torch.distributed`` each rank samples its shard of the users
    (every ``world_size``-th user in sorted order), so a user's examples always stay on one rank.
    """

    def __init__(
        self,
        user_ids: torch.Tensor,
        sample_rate: float,
        steps: int,
        random: RandomSource | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        users, example_user = torch.unique(user_ids, return_inverse=True)
        self.num_users = len(users)
        # The users are Poisson-sampled exactly as examples are (same checks, same draw), then expanded.
        self._users = PoissonBatchSampler(self.num_users, sample_rate, steps, random, rank, world_size)
        self.sample_rate, self.steps, self.random = sample_rate, steps, self._users.random
        order = torch.argsort(example_user, stable=True)
        counts = torch.bincount(example_user, minlength=self.num_users)
        self._examples_of = list(torch.split(order, counts.tolist()))  # example indices of each user

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for included in self._users:
            yield torch.cat([self._examples_of[u] for u in included] or [torch.zeros(0, dtype=torch.long)]).tolist()


class _RecordingBatchSampler(Sampler[list[int]]):
    """Passes batches through and remembers their indices, in order, for the loader to match with its batches."""

    def __init__(self, batch_sampler: Sampler[Sequence[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.indices: deque[list[int]] = deque()

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        self.indices.clear()
        for batch in self.batch_sampler:
            batch = list(batch)
            self.indices.append(batch)
            yield batch


class ChunkSignal:
    """Tells the DP optimizer whether the batch the user is processing ends a logical batch.

    The data loader updates it as it hands each physical chunk to the user; the optimizer reads it in ``step()``.
    Without a DP data loader every batch is its own logical batch.
    """

    def __init__(self) -> None:
        self.chunk_size: int | None = None
        self.is_last_chunk = True
        self.units: torch.Tensor | None = None  # under user-level privacy: the user of each row of the chunk
        self.logical_batch = 0  # counts logical batches handed out, so a step can tell its chunks apart
        self.chunk_id = 0  # counts chunks handed out (every logical batch has at least one): a forward's batch tag
        self.chunk_index = 0  # position of the current chunk in its logical batch

    def begin_chunk(self, size: int, is_last: bool, units: torch.Tensor | None = None, is_first: bool = True) -> None:
        self.chunk_size = size
        self.is_last_chunk = is_last
        self.units = units
        self.chunk_id += 1
        if is_first:
            self.logical_batch += 1
            self.chunk_index = 0
        else:
            self.chunk_index += 1


def batch_length(batch: Any) -> int:
    """Number of examples in a collated batch: the first dimension of its first tensor."""
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    raise TypeError("a batch must contain at least one tensor with a batch dimension")


def split_batch(batch: Any, max_size: int) -> list[Any]:
    """Split every tensor of ``batch`` along dim 0 into chunks of at most ``max_size`` examples."""
    size = batch_length(batch)
    starts = range(0, size, max_size) if size else [0]
    return [
        tree_map(lambda t: t[start : start + max_size] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)
        for start in starts
    ]


def empty_batch_collate(dataset: Dataset, collate_fn: Callable[[list], Any]) -> Callable[[list], Any]:
    """``collate_fn`` that turns an empty list into a batch of zero examples shaped like the dataset's items."""

    def collate(samples: list) -> Any:
        if len(samples) == 0:
            template = collate_fn([dataset[0]])
            return tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, template)
        return collate_fn(samples)

    return collate


class DPDataLoader(DataLoader):
    """A data loader over the user's dataset with DP batch selection and optional physical chunking.

    It keeps the user's dataset, collate function and worker settings, replaces batch selection by
    ``batch_sampler`` (Poisson by default), and, when ``max_physical_batch_size`` is set, hands each logical batch
    to the user in chunks of at most that many examples; the DP optimizer takes one real step per logical batch.
    """

    def __init__(
        self,
        data_loader: DataLoader,
        batch_sampler: Sampler[Sequence[int]],
        signal: ChunkSignal,
        max_physical_batch_size: int | None = None,
        user_ids: torch.Tensor | None = None,
        sample_rate: float | None = None,
    ) -> None:
        """``user_ids`` (one per dataset example) makes the loader report each chunk's users to the optimizer;
        ``sample_rate``: the rate the accountant records for each batch (Opacus' ``data_loader.sample_rate``)."""
        if max_physical_batch_size is not None and (
            isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) or max_physical_batch_size <= 0
        ):
            raise ValueError(f"max_physical_batch_size must be a positive integer or None, got {max_physical_batch_size!r}")
        collate_fn = data_loader.collate_fn or default_collate
        self.user_ids = user_ids
        if user_ids is not None:
            batch_sampler = _RecordingBatchSampler(batch_sampler)
        super().__init__(
            data_loader.dataset,
            batch_sampler=batch_sampler,
            num_workers=data_loader.num_workers,
            collate_fn=empty_batch_collate(data_loader.dataset, collate_fn),
            pin_memory=data_loader.pin_memory,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            multiprocessing_context=data_loader.multiprocessing_context,
            generator=data_loader.generator,
            prefetch_factor=data_loader.prefetch_factor,
            persistent_workers=data_loader.persistent_workers,
        )
        self.signal = signal
        self.max_physical_batch_size = max_physical_batch_size
        self.sample_rate = sample_rate

    @classmethod
    def from_data_loader(
        cls, data_loader: DataLoader, generator: torch.Generator | None = None, distributed: bool = False
    ) -> "DPDataLoader":
        """Opacus' ``DPDataLoader.from_data_loader``: the loader's dataset, collate function and workers with Poisson
        batches at rate 1 / len(data_loader), for len(data_loader) batches (``generator``: a seeded
        ``torch.Generator``; None: the OS). ``make_private`` given it samples at that same rate with the engine's own
        generator (its batch selection is always the engine's)."""
        if distributed:
            raise ValueError("DPDataLoader.from_data_loader(distributed=True) is not supported: make_private on a "
                             "DistributedDataParallel model samples each rank's shard itself")
        sample_rate = 1.0 / len(data_loader)
        sampler = PoissonBatchSampler(
            len(data_loader.dataset), sample_rate, len(data_loader), RandomSource(generator=generator)
        )
        return cls(data_loader, sampler, ChunkSignal(), sample_rate=sample_rate)

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            units = None
            if self.user_ids is not None:
                units = self.user_ids[torch.as_tensor(self.batch_sampler.indices.popleft(), dtype=torch.long)]
            if self.max_physical_batch_size is None:
                chunks = [batch]
            else:
                chunks = split_batch(batch, self.max_physical_batch_size)
            start = 0
            for k, chunk in enumerate(chunks):
                size = batch_length(chunk)
                chunk_units = units[start : start + size] if units is not None else None
                start += size
                self.signal.begin_chunk(size, is_last=k == len(chunks) - 1, units=chunk_units, is_first=k == 0)
                yield chunk
