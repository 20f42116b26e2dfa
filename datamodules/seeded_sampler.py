"""Training order and augmentation that are functions of ``(seed, epoch)`` alone.

A resumed run must see exactly the batches and the augmentations that the uninterrupted run would
have seen. Neither a ``RandomSampler`` (it draws from the global RNG) nor augmentation seeded from
the DataLoader's worker seeds (drawn from the global RNG; fixed for the life of persistent
workers; one stream for the whole run with ``num_workers=0``) survive a restart. Here:

- :class:`SeededSampler` permutes the training set with a generator seeded by ``(seed, epoch)``
  (Lightning calls ``set_epoch`` at every epoch start), shards it over DDP ranks like
  ``DistributedSampler`` (which it is, so Lightning keeps it under DDP);
- :meth:`SeededSampler.resume` starts a resumed run where the checkpoint left off, mid-epoch
  included (:class:`~datamodules.split_loaders.SplitDataModule` keeps the position in its
  checkpoint state);
- it yields :class:`SampleKey` ``(index, seed)``: the dataset seeds the sample's augmentation
  with that seed, a function of ``(seed, epoch, index)``. So the augmentation of an image does
  not depend on the number of workers, the rank, or whether the run was restarted.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple, Optional, Sized

import numpy as np
import torch
from torch.utils.data import DistributedSampler

__all__ = ["SampleKey", "SeededSampler", "sample_seed"]


class SampleKey(NamedTuple):
    """A dataset key: the sample ``index`` and the ``seed`` of its augmentation."""

    index: int
    seed: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, index % 2**32]).generate_state(1)[0])


class SeededSampler(DistributedSampler):
    """Shuffled training sampler yielding :class:`SampleKey` ``(index, augmentation seed)``.

    Args:
        dataset: the training set (only its length is used).
        seed: the run's seed (``seed_everything``).
        num_replicas, rank: DDP world size and rank; default: the initialized process group, or
            a single process.

    Every epoch is a permutation drawn from ``(seed, epoch)``; with ``N`` ranks each takes every ``N``-th
    index of it, the last ones padded with the first (as ``DistributedSampler`` does).
    """

    def __init__(self, dataset: Sized, seed: int, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)

        self._skip = 0

    def resume(self, epoch: int, samples_done: int) -> None:
        """Start at ``epoch`` without the first ``samples_done`` samples of this rank's share, which
        the interrupted run already trained on. The length stays that of a whole epoch (the
        training loop counts the batches done itself); the next :meth:`set_epoch` ends the skip."""
        super().set_epoch(epoch)
        self._skip = samples_done

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[SampleKey]:  # type: ignore[override]
        # DistributedSampler's permutation of seed + epoch would repeat across runs (seed 1, epoch 1
        # = seed 2, epoch 0): hash the pair instead.
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order += (order * math.ceil(self.total_size / len(order)))[: self.total_size - len(order)]
        for index in order[self.rank:self.total_size:self.num_replicas][self._skip:]:
            yield SampleKey(index, sample_seed(self.seed, self.epoch, index))
