"""Each epoch as numbered batches that ranks take: pulled (fast workers take more) or static, resumable mid-epoch.

With a static split (Lightning's DistributedSampler) every rank owns an equal share of each epoch,
so a 3x slower worker still has to finish its share and the epoch lasts as long as under DDP.
Here each epoch is one permutation, the same on every rank (seeded by ``seed + epoch``), cut into
numbered batches. With pulled work every rank first takes one batch of its own (so that every rank
trains at least once and reaches the epoch's end hooks), then claims the next free batch from an
atomic counter in torch.distributed's key-value store (``Store.add``) until the epoch is used up. With
static batches (recovery with ``pull_work=False``) rank r takes every N-th batch from the r-th. Every
sample is seen exactly once per epoch across all ranks, and a resumed epoch (see :meth:`resume`) leaves
out the batches trained before, which Lightning's DistributedSampler cannot do: Lightning 2.6 replays a
resumed static-shard epoch from its start.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler

_BATCH_BITS = 32  # a work id is (epoch << 32) | batch: ordered by epoch, unique across epochs


def work_id(epoch: int, batch: int) -> int:
    """The id a pushed gradient carries for batch ``batch`` of ``epoch`` (see ``ParameterServer.push``)."""
    return (epoch << _BATCH_BITS) | batch


def done_by_epoch(work_ids: Iterable[int]) -> dict[int, list[int]]:
    """The batches ``work_ids`` name, sorted, per epoch."""
    done: dict[int, list[int]] = {}
    for work in sorted(work_ids):
        done.setdefault(work >> _BATCH_BITS, []).append(work & ((1 << _BATCH_BITS) - 1))
    return done


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of an epoch of numbered batches; subclasses choose which.

    ``sampler`` gives the epoch's order: a one-replica ``DistributedSampler`` (seeded by ``seed + epoch``,
    the same on every rank), whose ``set_epoch`` Lightning calls as it does for a ``BatchSampler``'s
    sampler. There is no length on purpose: ranks take different numbers of batches, and Lightning ends
    the epoch when the iterator does. ``store`` counts the batches taken across ranks (it outlives any rank).
    """

    def __init__(
        self,
        sampler: DistributedSampler,
        batch_size: int,
        *,
        drop_last: bool,
        rank: int,
        num_workers: int,
        store: dist.Store,
        namespace: str,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.rank, self.num_workers = rank, num_workers
        self._store, self._namespace = store, namespace
        self._done: dict[int, frozenset[int]] = {}  # per epoch, batches trained before a resume
        self._remaining: list[int] = []  # the running epoch's batches to train
        self._reserved = 0  # of which the first are taken without the store's counter
        self.yielded: list[int] = []  # batch ids this rank took in the current epoch, in order
        self.trained = 0  # of which this rank has started training on (the rest are prefetched)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def num_batches(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full if self.drop_last or not rest else full + 1

    @property
    def done(self) -> frozenset[int]:
        return self._done.get(self.epoch, frozenset())

    @property
    def current_work(self) -> int:
        """The work id of the batch this rank trains now (the last one it started)."""
        return work_id(self.epoch, self.yielded[self.trained - 1])

    def resume(self, epoch: int, done: Mapping[int, Sequence[int]]) -> None:
        """Continue at ``epoch``; every epoch in ``done`` (``epoch`` and maybe the next, whose batches fast ranks
        began before the checkpoint) runs without its batches listed there (trained before the checkpoint)."""
        self.sampler.set_epoch(epoch)
        self._done = {e: frozenset(batches) for e, batches in done.items()}

    def indices(self, batch: int) -> list[int]:
        """The dataset indices of batch ``batch`` of the running epoch."""
        return list(self.sampler)[batch * self.batch_size : (batch + 1) * self.batch_size]

    def claimed(self) -> int:
        """How many batches of the running epoch all ranks together have taken so far (read from the store)."""
        if self._reserved == len(self._remaining):
            return self._reserved
        taken = self._store.add(self._counter, 0)
        return min(len(self._remaining), self._reserved + taken)

    @property
    def _counter(self) -> str:
        return f"{self._namespace}/epoch{self.epoch}"

    def __iter__(self) -> Iterator[list[int]]:
        self.yielded, self.trained = [], 0
        done = self.done
        remaining = self._remaining = [b for b in range(self.num_batches) if b not in done]
        if 0 < len(remaining) < self.num_workers:
            # a resumed epoch with fewer batches left than ranks: Lightning runs an epoch's end (validation, its
            # collectives) only on ranks that trained in it, so every rank takes one, some a batch trained before
            remaining += sorted(done)[: self.num_workers - len(remaining)]
        order = list(self.sampler)
        for batch in self._take(remaining):
            self.yielded.append(batch)
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size]

    @abc.abstractmethod
    def _take(self, remaining: list[int]) -> Iterator[int]:
        """This rank's batches of ``remaining``, in order."""


class PulledBatchSampler(EpochBatchSampler):
    """Fast workers take more: each rank's first batch is its own, the rest are claimed from the store's
    counter."""

    def _take(self, remaining: list[int]) -> Iterator[int]:
        reserved = self._reserved = min(self.num_workers, len(remaining))
        if self.rank < reserved:
            yield remaining[self.rank]
        if reserved == len(remaining):
            return
        while (position := reserved - 1 + self._store.add(self._counter, 1)) < len(remaining):
            yield remaining[position]


class StaticBatchSampler(EpochBatchSampler):
    """Rank r takes every N-th batch left from the r-th: a fixed share, like Lightning's static shards, but of
    numbered batches, so that a resumed epoch (see :meth:`resume`) skips those trained before, even when N
    changed. Each take is counted in the store, so that a recovery checkpoint knows how many were taken."""

    def _take(self, remaining: list[int]) -> Iterator[int]:
        self._reserved = 0
        for batch in remaining[self.rank :: self.num_workers]:
            self._store.add(self._counter, 1)
            yield batch


def epoch_dataloader(dataloader: DataLoader, *, pull: bool, **sampler_kwargs: Any) -> DataLoader:
    """The user's DataLoader (dataset, workers, pin_memory, collate_fn, ...) with a :class:`PulledBatchSampler`
    (``pull``) or a :class:`StaticBatchSampler`."""
    dataset = dataloader.dataset
    fix = "use static sharding instead: HybridSGDStrategy(pull_work=False)" if pull else "or recovery_dir=None"
    what = "pulled work" if pull else "resuming an epoch where it stopped (recovery_dir)"
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"{what} needs a map-style dataset with a length, got an IterableDataset: {fix}")
    try:
        len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(f"{what} needs a dataset with a length: {fix}") from err
    if dataloader.batch_size is None:
        raise ValueError(f"{what} needs a DataLoader with batch_size (not a custom batch_sampler): {fix}")
    user_sampler = dataloader.sampler
    epoch_order = DistributedSampler(
        dataset,  # type: ignore[arg-type]
        num_replicas=1,
        rank=0,
        shuffle=bool(getattr(user_sampler, "shuffle", isinstance(user_sampler, RandomSampler))),
        seed=int(getattr(user_sampler, "seed", 0)),
    )
    batch_sampler = (PulledBatchSampler if pull else StaticBatchSampler)(
        epoch_order, dataloader.batch_size, drop_last=dataloader.drop_last, **sampler_kwargs
    )
    kwargs: dict[str, Any] = dict(
        batch_sampler=batch_sampler,
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        persistent_workers=dataloader.persistent_workers,
        pin_memory_device=dataloader.pin_memory_device,
    )
    if dataloader.num_workers > 0:
        kwargs["prefetch_factor"] = dataloader.prefetch_factor
    return DataLoader(dataset, **kwargs)
