"""The ImageNet-layout loader, its pipelines, the demo generator and their errors."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules.demo import SHAPES, classification_demo
from datamodules.image_folder import (CorruptImageError, ImageFolder, ImageList, collate_readable, find_classes,
                                      list_samples, read_image)
from datamodules.imagenet import ImageNetDataModule, eval_transform, train_transform


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return classification_demo(tmp_path_factory.mktemp("demo"), train_per_class=6, val_per_class=3, image_size=48)


def _copy(demo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(demo, root)
    return root


def _dm(root: Path, **kwargs) -> ImageNetDataModule:
    kwargs = {"image_size": 32, "batch_size": 4, "num_workers": 0, "pin_memory": False, **kwargs}
    return ImageNetDataModule(root=str(root), **kwargs)


# --------------------------------------------------------------------------- demo data
def test_demo_layout_is_imagenet_like_and_reused(demo, tmp_path):
    assert sorted(p.name for p in (demo / "train").iterdir()) == sorted(SHAPES)
    for split, count in (("train", 6), ("val", 3)):
        for cls in SHAPES:
            files = sorted((demo / split / cls).glob("*.JPEG"))
            assert len(files) == count
            assert read_image(files[0]).shape == (48, 48, 3)
    before = (demo / "train" / "circle").stat().st_mtime_ns
    again = classification_demo(demo.parent, train_per_class=6, val_per_class=3, image_size=48)
    assert again == demo and (demo / "train" / "circle").stat().st_mtime_ns == before
    # the generator is seeded: a second cache folder gets identical pixels
    other = classification_demo(tmp_path, train_per_class=6, val_per_class=3, image_size=48)
    name = "train/star/star_train_00004.JPEG"
    assert np.array_equal(read_image(other / name), read_image(demo / name))


def test_demo_classes_differ_in_shape_not_only_colour(demo):
    # mean colours of two classes overlap (random colours), so a model must look at shapes
    means = {c: np.mean([read_image(p).mean() for p in (demo / "train" / c).glob("*.JPEG")]) for c in ("circle", "cross")}
    assert abs(means["circle"] - means["cross"]) < 60


# --------------------------------------------------------------------------- folder listing
def test_classes_sorted_and_samples_labelled(demo):
    classes = find_classes(demo / "train")
    assert classes == sorted(classes)
    samples = list_samples(demo / "val", classes)
    assert len(samples) == 3 * len(classes)
    for path, label in samples:
        assert Path(path).parent.name == classes[label]


def test_missing_root_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"data root .*nope does not exist"):
        _dm(missing).num_classes


def test_missing_split_folder(demo, tmp_path):
    root = _copy(demo, tmp_path)
    shutil.rmtree(root / "val")
    dm = _dm(root)
    with pytest.raises(FileNotFoundError, match=r"val does not exist"):
        dm.setup("fit")


def test_empty_class_folder_fails_before_training(demo, tmp_path):
    root = _copy(demo, tmp_path)
    for f in (root / "train" / "ring").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"empty class folder.*train/ring"):
        _dm(root).setup("fit")


def test_val_classes_must_match_train(demo, tmp_path):
    root = _copy(demo, tmp_path)
    shutil.rmtree(root / "val" / "star")
    (root / "val" / "zebra").mkdir()
    shutil.copy(next((root / "val" / "ring").iterdir()), root / "val" / "zebra" / "a.JPEG")
    with pytest.raises(ValueError, match=r"missing class folder\(s\): star.*not in the class list: zebra"):
        _dm(root).setup("validate")


# --------------------------------------------------------------------------- corrupt files
def _corrupt(root: Path) -> Path:
    victim = sorted((root / "train" / "circle").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # truncated JPEG
    return victim


def test_corrupt_jpeg_error_names_the_file(demo, tmp_path):
    root = _copy(demo, tmp_path)
    victim = _corrupt(root)
    with pytest.raises(CorruptImageError, match=str(victim)):
        read_image(victim)
    samples = list_samples(root / "train", find_classes(root / "train"))
    ds = ImageFolder(samples)
    index = [p for p, _ in samples].index(str(victim))
    with pytest.raises(CorruptImageError, match=victim.name):
        ds[index]


def test_skip_corrupt_replaces_and_counts(demo, tmp_path, caplog):
    root = _copy(demo, tmp_path)
    victim = _corrupt(root)
    samples = list_samples(root / "train", find_classes(root / "train"))
    index = [p for p, _ in samples].index(str(victim))
    ds = ImageFolder(samples, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        image, label = ds[index]
    assert ds.skipped == 1 and image.shape == (3, 48, 48)
    assert label == samples[index + 1][1]
    assert victim.name in caplog.text and "1 image(s) skipped" in caplog.text


def test_evaluation_sets_drop_a_skipped_image_instead_of_repeating_another(demo, tmp_path):
    root = _copy(demo, tmp_path)
    victim = _corrupt(root)
    samples = list_samples(root / "train", find_classes(root / "train"))
    index = [p for p, _ in samples].index(str(victim))
    ds = ImageFolder(samples, skip_corrupt=True, drop_corrupt=True)
    assert ds[index] is None and ds.skipped == 1
    batch = collate_readable([ds[index - 1], ds[index], ds[index + 1]])
    assert batch[0].shape == (2, 3, 48, 48) and batch[1].tolist() == [samples[index - 1][1], samples[index + 1][1]]
    assert collate_readable([None, None]) is None
    listed = ImageList([str(victim), samples[0][0]], None, skip_corrupt=True)  # prediction lists drop too
    assert listed[0] is None and listed[1][1] == samples[0][0]


def test_images_of_different_sizes_in_one_batch_are_named():
    small, large = (torch.zeros(3, 4, 6), "a.png"), (torch.zeros(3, 8, 6), "b.png")
    with pytest.raises(ValueError, match=r"different sizes .*a\.png \(4x6\), b\.png \(8x6\).*--data.val_batch_size 1"):
        collate_readable([small, large])
    assert collate_readable([small, small])[0].shape == (2, 3, 4, 6)


def test_not_an_image_is_reported(tmp_path):
    bogus = tmp_path / "x.JPEG"
    bogus.write_text("hello")
    with pytest.raises(CorruptImageError, match=r"cannot decode image .*x\.JPEG"):
        read_image(bogus)


# --------------------------------------------------------------------------- pipelines
def test_pipelines_shapes_and_normalization():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    out = train_transform(64, scale=(0.5, 1.0))(image=image)["image"]
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    # val: shorter side to 64/0.875 = 73, then a centred 64x64 crop
    out = eval_transform((64, 64))(image=image)["image"]
    assert out.shape == (3, 64, 64)
    resized = cv2.resize(image, (97, 73), interpolation=cv2.INTER_LINEAR)
    top, left = (73 - 64) // 2, (97 - 64) // 2
    expected = (resized[top:top + 64, left:left + 64] / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(out.permute(1, 2, 0).numpy(), expected, atol=0.05)
    with pytest.raises(ValueError, match="val_crop_ratio"):
        eval_transform(64, crop_ratio=1.5)


def test_datamodule_batches_and_num_classes(demo):
    dm = _dm(demo, image_size=(32, 40))
    assert dm.num_classes == len(SHAPES) and dm.classes == sorted(SHAPES)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 40) and y.dtype == torch.int64
    dm.setup("predict")
    x, paths = next(iter(dm.predict_dataloader()))
    assert x.shape == (4, 3, 32, 40) and all(Path(p).is_file() for p in paths)


def test_training_batches_are_a_function_of_seed_and_epoch(demo):
    """Order and augmentation follow data.seed and the epoch only: not the global RNG, not the
    number of workers (what makes a resumed run exact)."""
    def first_batch(seed: int, epoch: int = 0, torch_seed: int = 0, workers: int = 0):
        torch.manual_seed(torch_seed)
        dm = _dm(demo, seed=seed, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    (a, ya), (b, yb) = first_batch(3), first_batch(3, torch_seed=1, workers=2)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, first_batch(4)[0])
    assert not torch.equal(a, first_batch(3, epoch=1)[0])
