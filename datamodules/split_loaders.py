"""How a datamodule's splits become DataLoaders, with exact evaluation under DDP.

:class:`SplitDataModule` serves ``self.datasets[split]`` for the four stages: training shuffled
with ``drop_last`` (and an error when the batch is larger than the set), evaluation in order with
:func:`distributed_eval_sampler`, so every image is on exactly one rank and none is repeated.

Lightning's val/test ``DistributedSampler`` pads the shorter ranks with repeated samples so that
every rank runs the same number of batches; a dataset-level metric (top-1, mIoU) would count those
samples twice. The metrics here are torchmetrics states reduced at epoch end, so ranks may run
different numbers of batches.
"""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["distributed_eval_sampler", "SplitDataModule"]


def distributed_eval_sampler(dataset: Dataset) -> Optional[Sampler]:
    """A sampler that gives each DDP rank a disjoint share of ``dataset`` (no padding duplicates).

    Lightning's own val/test DistributedSampler repeats samples to even out the ranks, which
    would count those images twice in a dataset-level mIoU. ``None`` when not distributed.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    world = dist.get_world_size()
    if len(dataset) < world:  # UnrepeatedDistributedSampler would fail on a bare assert
        raise ValueError(f"evaluation set of {len(dataset)} images is smaller than the {world} DDP processes")
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class SplitDataModule(pl.LightningDataModule):
    """Loaders over ``self.datasets`` (``train``, ``val``, ``test``, ``predict``), filled by ``setup``.

    Subclasses set ``batch_size``, ``val_batch_size``, ``num_workers``, ``pin_memory`` and
    ``persistent_workers``.
    """

    datasets: dict[str, Dataset]
    batch_size: int
    val_batch_size: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            shuffle=train,
            drop_last=train,
            sampler=None if train else distributed_eval_sampler(dataset),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        if len(self.datasets["train"]) < self.batch_size:  # drop_last would leave no batch at all
            raise ValueError(
                f"data.batch_size {self.batch_size} exceeds the {len(self.datasets['train'])} training images"
            )
        return self._loader(self.datasets["train"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["predict"], train=False)
