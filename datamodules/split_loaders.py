"""How a datamodule's splits become DataLoaders, with exact evaluation under DDP.

:class:`SplitDataModule` serves ``self.datasets[split]`` for the four stages: training in the
order and with the augmentation seeds of :class:`SeededSampler`, with ``drop_last`` (and an error
when the batch is larger than the set); evaluation in order with :func:`distributed_eval_sampler`,
so every image is on exactly one rank and none is repeated. Its checkpoint state is the training
position (epoch and batches done, read through :mod:`tasks.lightning.adapter`), so a resumed run, even one
stopped mid-epoch, sees the batches the uninterrupted run would have seen.

Lightning's val/test ``DistributedSampler`` pads the shorter ranks with repeated samples so that
every rank runs the same number of batches; a dataset-level metric (top-1, mIoU) would count those
samples twice. The metrics here are torchmetrics states reduced at epoch end, so ranks may run
different numbers of batches.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from tasks.lightning.adapter import batches_done

from .demo import generator_identity
from .image_folder import collate_readable
from .seeded_sampler import SeededSampler

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

    Subclasses set ``seed``, ``batch_size``, ``val_batch_size``, ``num_workers``, ``pin_memory``
    and ``persistent_workers``, then call :meth:`_check_loader_settings` in their constructor; for
    :meth:`describe` they set ``root``, ``test_split`` and ``image_size``, and name ``data_kind``
    and their ``demo`` generator.
    """

    data_kind: str  # the dataset family, as :meth:`describe` records it
    demo: tuple[Callable[..., Path], int]  # the generator (and its version) of the data used when root is None
    root: Optional[str]
    test_split: str
    image_size: tuple[int, int]
    datasets: dict[str, Dataset]
    seed: int
    batch_size: int
    val_batch_size: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool

    _resume: Optional[dict[str, int]] = None  # training position of a checkpoint being resumed

    def _check_loader_settings(self) -> None:
        """Raise ValueError naming the ``data.`` option when a batch size is below 1 or
        ``num_workers`` below 0: checked at construction, where DataLoader's own error would
        come at the first batch and name no option."""
        for name, least in (("batch_size", 1), ("val_batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"data.{name} must be an integer >= {least}, got {value!r}")

    def describe(self) -> dict[str, Any]:
        """What the test stage evaluates, JSON-able (``results.json`` records it as ``data``):
        ``kind``; ``root``, the absolute data root, or, for the generated demo data (``root``
        None), ``generator`` (:func:`datamodules.demo.generator_identity`: name, version, sizes,
        seed); ``split``, the split the test stage reads; ``image_size`` ``[h, w]``; and what
        subclasses add (``classes`` or verification ``sets``). Every field but ``image_size``,
        which follows the model, identifies the data."""
        source = ({"generator": generator_identity(*self.demo)} if self.root is None
                  else {"root": str(Path(self.root).resolve())})
        return {"kind": self.data_kind, **source, "split": self.test_split, "image_size": list(self.image_size)}

    def calibration_set(self) -> Dataset:
        """The training images with the evaluation transform (subclasses): what INT8 is calibrated on."""
        raise NotImplementedError(f"{type(self).__name__} offers no calibration images")

    def calibration_batches(self, count: int, seed: int) -> list[torch.Tensor]:
        """``count`` training images chosen with ``seed``, evaluation transform, in batches of
        ``val_batch_size``: the INT8 calibration set (from the training split: never the test data)."""
        dataset = self.calibration_set()
        if len(dataset) == 0:
            raise ValueError("INT8 calibration needs training images, and the training split is empty")
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
        loader = DataLoader(Subset(dataset, chosen), batch_size=self.val_batch_size, collate_fn=collate_readable)
        return [batch[0] for batch in loader if batch is not None]

    def state_dict(self) -> dict[str, int]:
        """The training position, saved in every checkpoint: the epoch, the batches of it done, and
        the epoch's length in batches."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn is None or trainer.state.fn.value != "fit":
            return {}
        return {"epoch": trainer.current_epoch, "batches_done": batches_done(trainer),
                "batches_per_epoch": int(trainer.num_training_batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) if state else None

    def _train_sampler(self, dataset: Dataset) -> SeededSampler:
        sampler = SeededSampler(dataset, self.seed)
        if self._resume is not None:
            # Lightning creates the first resumed epoch's iterator before it calls set_epoch
            epoch, done = self._resume["epoch"], self._resume["batches_done"]
            if done >= self._resume["batches_per_epoch"]:  # saved at the end of an epoch
                epoch, done = epoch + 1, 0
            sampler.resume(epoch, done * self.batch_size)
            self._resume = None
        return sampler

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            drop_last=train,
            sampler=self._train_sampler(dataset) if train else distributed_eval_sampler(dataset),
            collate_fn=None if train else collate_readable,  # evaluation drops skipped corrupt images
            # The loader's worker seeds come from its own generator: drawn from the global RNG, a
            # persistent worker pool created at a different point of a resumed run would shift
            # the stream that dropout draws from.
            generator=torch.Generator().manual_seed(self.seed),
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
