"""What every datamodule shares (:class:`datamodules.split_loaders.SplitDataModule`): loader
settings checked at construction, and the description of the test data."""
from __future__ import annotations

import json

import pytest

from datamodules.cityscapes import CLASSES, CityscapesDataModule
from datamodules.demo import CITYSCAPES_DEMO_VERSION, SHAPES, classification_demo, cityscapes_demo, generator_identity
from datamodules.demo_faces import DEMO_VERIFICATION_SETS
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


def test_describe_a_class_folder_root(tmp_path, monkeypatch):
    root = classification_demo(tmp_path, train_per_class=1, val_per_class=1, image_size=32)
    monkeypatch.chdir(root.parent)  # a relative root is recorded as an absolute path
    dm = ImageNetDataModule(root=root.name, image_size=(40, 48), test_split="train")
    assert dm.describe() == {"kind": "image_folder_classification", "root": str(root.resolve()), "split": "train",
                             "image_size": [40, 48], "classes": sorted(SHAPES)}


def test_describe_the_generated_demo_by_its_generator():
    described = CityscapesDataModule(image_size=(64, 128)).describe()  # nothing generated: the classes are fixed
    assert described == {"kind": "cityscapes", "generator": generator_identity(cityscapes_demo, CITYSCAPES_DEMO_VERSION),
                         "split": "val", "image_size": [64, 128], "classes": list(CLASSES)}
    assert set(described["generator"]) == {"name", "version", "train_images", "val_images", "width", "height", "seed"}
    assert generator_identity(cityscapes_demo, CITYSCAPES_DEMO_VERSION, seed=3)["seed"] == 3
    assert json.loads(json.dumps(described)) == described


def test_describe_verification_sets(small_face_root):
    dm = FaceDataModule(root=str(small_face_root), val_sets=[*DEMO_VERIFICATION_SETS, "lfw"], image_size=64)
    assert dm.describe() == {"kind": "face_verification", "root": str(small_face_root.resolve()), "split": "val",
                             "image_size": [64, 64], "sets": list(DEMO_VERIFICATION_SETS)}  # lfw is absent
