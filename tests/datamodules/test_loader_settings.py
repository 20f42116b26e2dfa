"""Loader settings every datamodule shares (:class:`datamodules.split_loaders.SplitDataModule`)."""
from __future__ import annotations

import pytest

from datamodules.cityscapes import CityscapesDataModule
from datamodules.faces import FaceDataModule
from datamodules.imagenet import ImageNetDataModule

DATAMODULES = [ImageNetDataModule, CityscapesDataModule, FaceDataModule]


BAD = [("batch_size", 0), ("batch_size", -2), ("val_batch_size", 0), ("num_workers", -1)]


@pytest.mark.parametrize("cls,option,value", [
    (cls, option, value) for cls in DATAMODULES for option, value in BAD
    if not (cls is ImageNetDataModule and option == "val_batch_size")  # it evaluates with batch_size
])
def test_bad_loader_settings_are_named_at_construction(cls, option, value):
    with pytest.raises(ValueError, match=rf"data\.{option} must be an integer >= \d, got {value}"):
        cls(root="/nonexistent", **{option: value})


@pytest.mark.parametrize("cls", DATAMODULES)
def test_least_loader_settings_are_accepted(cls):
    extra = {} if cls is ImageNetDataModule else {"val_batch_size": 1}
    dm = cls(root="/nonexistent", batch_size=1, num_workers=0, **extra)
    assert (dm.batch_size, dm.val_batch_size, dm.num_workers) == (1, 1, 0)
