"""Evaluation sampling under DDP: every image on exactly one rank, none repeated.

Lightning's val/test ``DistributedSampler`` pads the shorter ranks with repeated samples so that
every rank runs the same number of batches; a dataset-level metric (top-1, mIoU) would count those
samples twice. The metrics here are torchmetrics states reduced at epoch end, so ranks may run
different numbers of batches.
"""
from __future__ import annotations

from typing import Optional

import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler

__all__ = ["distributed_eval_sampler"]


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
