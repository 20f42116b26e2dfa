"""The Cityscapes-layout loader, its mmseg-style pipelines, the street-scene demo generator and their errors."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

from datamodules.cityscapes import (
    CLASSES,
    ID_TO_TRAINID,
    IGNORE_INDEX,
    LABEL_IDS_SUFFIX,
    PALETTE,
    CatMaxRatioCrop,
    CityscapesDataModule,
    CityscapesSegmentation,
    label_paths,
    list_pairs,
    read_label,
    rescale_size,
    train_transform,
)
from conftest import copy_root
from datamodules.demo import cityscapes_demo
from datamodules.split_loaders import distributed_eval_sampler
from datamodules.image_folder import read_image
from datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD

W, H = 128, 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return cityscapes_demo(tmp_path_factory.mktemp("demo"), train_images=6, val_images=8, width=W, height=H)


def _copy(demo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(demo, root)
    return root


def _dm(root: Path, **kwargs) -> CityscapesDataModule:
    kwargs = {"image_size": (48, 64), "scale": (W, H), "batch_size": 3, "num_workers": 0, "pin_memory": False, **kwargs}
    return CityscapesDataModule(root=str(root), **kwargs)


def _val_pairs(root: Path) -> list[tuple[str, str]]:
    return list_pairs(root, "val")


# --------------------------------------------------------------------------- demo data
def test_demo_layout_is_cityscapes_like_and_reused(demo, tmp_path):
    cities = {"train": {"demotown", "samplecity"}, "val": {"valville"}}
    for split, count in (("train", 6), ("val", 8)):
        assert {p.name for p in (demo / "leftImg8bit" / split).iterdir()} == cities[split]
        assert {p.name for p in (demo / "gtFine" / split).iterdir()} == cities[split]
        images = sorted((demo / "leftImg8bit" / split).glob("*/*"))
        assert len(images) == count
        for image in images:
            city = image.parent.name
            match = re.fullmatch(rf"{city}_(\d{{6}})_(\d{{6}})_leftImg8bit\.png", image.name)
            assert match, image.name
            label = demo / "gtFine" / split / city / f"{city}_{match[1]}_{match[2]}_gtFine_labelIds.png"
            assert label.is_file()
            assert read_image(image).shape == (H, W, 3)
            ids = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
            assert ids.shape == (H, W) and ids.dtype == np.uint8 and ids.max() <= 33
        assert len(list((demo / "gtFine" / split).glob("*/*"))) == count  # labelIds only, no trainIds
    stamp = (demo / "leftImg8bit" / "val").stat().st_mtime_ns
    again = cityscapes_demo(demo.parent, train_images=6, val_images=8, width=W, height=H)
    assert again == demo and (demo / "leftImg8bit" / "val").stat().st_mtime_ns == stamp
    # seeded: another cache folder gets identical files; another seed different ones
    other = cityscapes_demo(tmp_path, train_images=6, val_images=8, width=W, height=H)
    name = "leftImg8bit/train/samplecity/samplecity_000004_000019_leftImg8bit.png"
    assert np.array_equal(read_image(other / name), read_image(demo / name))
    reseeded = cityscapes_demo(tmp_path, train_images=6, val_images=8, width=W, height=H, seed=1)
    assert not np.array_equal(read_image(reseeded / name), read_image(demo / name))


def test_demo_looks_learnable(demo):
    counts = np.zeros(256, np.int64)
    for _, label in _val_pairs(demo):
        counts += np.bincount(read_label(label).ravel(), minlength=256)
    share = counts / counts.sum()
    for name in ("road", "sky", "building"):
        assert share[CLASSES.index(name)] > 0.05, (name, share[CLASSES.index(name)])
    assert (counts[:19] > 0).sum() >= 8
    assert 0 < share[IGNORE_INDEX] < 0.2  # the ego-vehicle / unlabeled ids are present and ignored
    # colours vary around class colours: one class is not one exact colour
    image, label = read_image(_val_pairs(demo)[0][0]), read_label(_val_pairs(demo)[0][1])
    road = image[label == CLASSES.index("road")]
    assert road.std(0).min() > 3


# --------------------------------------------------------------------------- ids, files
def test_id_to_trainid_table():
    assert ID_TO_TRAINID.shape == (256,) and ID_TO_TRAINID.dtype == np.uint8
    for label_id, train_id in ((0, 255), (1, 255), (6, 255), (7, 0), (8, 1), (11, 2), (17, 5), (23, 10),
                               (24, 11), (26, 13), (29, 255), (30, 255), (31, 16), (33, 18)):
        assert ID_TO_TRAINID[label_id] == train_id, label_id
    kept = ID_TO_TRAINID[:34][ID_TO_TRAINID[:34] != 255]
    assert sorted(kept.tolist()) == list(range(19))  # every trainId exactly once
    assert len(CLASSES) == len(PALETTE) == 19 and CLASSES[0] == "road" and CLASSES[18] == "bicycle"
    assert PALETTE[13] == (0, 0, 142)


def test_pairs_sorted_and_label_train_ids_preferred(demo, tmp_path):
    root = _copy(demo, tmp_path)
    pairs = list_pairs(root, "train")
    assert [p for p, _ in pairs] == sorted(p for p, _ in pairs) and len(pairs) == 6
    assert all(label.endswith("_gtFine_labelIds.png") for _, label in pairs)
    image = pairs[2][0]
    train_ids, label_ids = label_paths(root, "train", image)
    assert label_ids == Path(pairs[2][1])
    cv2.imwrite(str(train_ids), np.full((H, W), 5, np.uint8))
    pairs = list_pairs(root, "train")
    assert pairs[2] == (image, str(train_ids))
    _, label = CityscapesSegmentation(pairs)[2]
    assert label.dtype == torch.int64 and label.shape == (H, W) and bool((label == 5).all())
    # a labelIds file is mapped: its ids and the loaded trainIds agree through the table
    ids = cv2.imread(pairs[0][1], cv2.IMREAD_UNCHANGED)
    image0, label0 = CityscapesSegmentation(pairs)[0]
    assert image0.shape == (3, H, W) and image0.dtype == torch.uint8
    assert np.array_equal(label0.numpy(), ID_TO_TRAINID[ids])


# --------------------------------------------------------------------------- pipelines
def test_train_batches_are_crops_with_train_ids(demo):
    dm = _dm(demo)
    assert dm.num_classes == 19 and dm.classes == list(CLASSES) and dm.ignore_index == 255
    assert dm.palette[0] == (128, 64, 128) and dm.data_root == demo
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 2  # 6 images, batch 3, drop_last
    for x, y in dm.train_dataloader():
        assert x.shape == (3, 3, 48, 64) and x.dtype == torch.float32
        assert y.shape == (3, 48, 64) and y.dtype == torch.int64
        values = set(y.unique().tolist())
        assert values <= set(range(19)) | {255} and len(values - {255}) >= 2


def test_val_returns_full_resolution_image_and_label(demo):
    dm = _dm(demo, val_batch_size=2)
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert loader.sampler.__class__.__name__ == "SequentialSampler"
    x, y = next(iter(loader))
    assert x.shape == (2, 3, H, W) and y.shape == (2, H, W) and y.dtype == torch.int64
    image_path, label_path = _val_pairs(demo)[0]
    expected = (read_image(image_path) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), expected, atol=1e-4)
    assert np.array_equal(y[0].numpy(), ID_TO_TRAINID[cv2.imread(label_path, cv2.IMREAD_UNCHANGED)])


def test_rescale_keeps_ratio_like_mmcv():
    # fit within (2048, 1024): the long side to at most 2048, the short side to at most 1024
    assert rescale_size(2048, 1024, (2048, 1024)) == (2048, 1024)
    assert rescale_size(256, 128, (1024, 512)) == (1024, 512)
    assert rescale_size(256, 128, (1024, 1024)) == (1024, 512)
    assert rescale_size(100, 300, (2048, 1024)) == (683, 2048)  # portrait: long side limits, orientation-free


def test_small_image_is_padded_with_zero_image_and_ignore_label():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (40, 60), dtype=np.uint8)
    # ratio 1: the image stays 60x40; the 64x96 crop does not fit and is padded at bottom/right
    transform = train_transform((64, 96), scale=(60, 40), ratio_range=(1.0, 1.0))
    for seed in range(4):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=label)
        x, y = out["image"], torch.as_tensor(out["mask"])
        assert x.shape == (3, 64, 96) and y.shape == (64, 96)
        # mmseg pads after normalization (SegDataPreProcessor): 0 in the normalized image
        assert bool((x[:, 40:] == 0).all()) and bool((x[:, :, 60:] == 0).all())
        assert bool((y[40:] == 255).all()) and bool((y[:, 60:] == 255).all())
        inside = y[:40, :60].numpy()  # labels are exact: the original, or its mirror
        assert np.array_equal(inside, label) or np.array_equal(inside, label[:, ::-1])


def test_cat_max_ratio_retries_reduce_the_dominant_class():
    # 90% of the image is class 0; classes 1 and 2 share a stripe at the right
    label = np.zeros((100, 1000), np.uint8)
    label[:, 900:] = 1
    label[50:, 900:] = 2
    label[:5] = 255  # ignored pixels do not count

    def dominant_shares(cat_max_ratio: float) -> np.ndarray:
        crop = CatMaxRatioCrop((100, 100), cat_max_ratio=cat_max_ratio)
        shares = []
        for seed in range(200):
            crop.set_random_seed(seed)
            y = crop(image=np.zeros((100, 1000, 3), np.uint8), mask=label)["mask"]
            counts = np.bincount(y.ravel(), minlength=256)[:255]
            shares.append(counts.max() / counts.sum())
        return np.array(shares)

    plain, retried = dominant_shares(1.0), dominant_shares(0.75)
    assert (plain < 0.75).mean() < 0.15  # a single uniform draw rarely reaches the stripe
    assert (retried < 0.75).mean() > 0.5
    assert retried.mean() < plain.mean() - 0.2


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


def test_pipeline_steps_get_independent_seeds():
    transform = train_transform((32, 32), scale=(64, 32))
    transform.set_random_seed(7)
    seeds = [t.seed for t in transform.transforms]
    assert len(set(seeds)) == len(seeds)
    transform.set_random_seed(7)
    assert [t.seed for t in transform.transforms] == seeds


# --------------------------------------------------------------------------- test split, predict, DDP
def test_image_only_test_split_and_predict(demo, tmp_path):
    root = _copy(demo, tmp_path)
    (root / "leftImg8bit" / "val").rename(root / "leftImg8bit" / "test")  # labels are not public for test
    dm = _dm(root, test_split="test")
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (1, 3, H, W) and bool((y == IGNORE_INDEX).all())
    dm.setup("predict")
    x, paths = next(iter(dm.predict_dataloader()))
    assert x.shape == (1, 3, H, W) and paths[0].endswith("_leftImg8bit.png") and "/test/" in paths[0]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(paths[0], folder / "sub" / "a.png")
    dm = _dm(root, predict_root=str(folder))
    dm.setup("predict")
    assert dm.datasets["predict"].paths == [str(folder / "sub" / "a.png")]


def test_distributed_eval_sampler_splits_without_repeats(demo, monkeypatch):
    dataset = CityscapesSegmentation(_val_pairs(demo))
    assert distributed_eval_sampler(dataset) is None  # not distributed
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 3)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda *a, r=rank, **k: r)
        sampler = distributed_eval_sampler(dataset)
        assert isinstance(sampler, UnrepeatedDistributedSampler)
        seen += list(sampler)
    assert sorted(seen) == list(range(8))  # 8 images over 3 ranks: 3 + 3 + 2, none twice
    dm = _dm(demo)
    dm.setup("validate")
    assert isinstance(dm.val_dataloader().sampler, UnrepeatedDistributedSampler)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 9)
    with pytest.raises(ValueError, match="8 images is smaller than the 9 DDP processes"):
        distributed_eval_sampler(dataset)


# --------------------------------------------------------------------------- bad input
def test_image_without_label_names_it_and_both_paths(demo, tmp_path):
    root = _copy(demo, tmp_path)
    image, label = list_pairs(root, "val")[3]
    Path(label).unlink()
    with pytest.raises(FileNotFoundError) as err:
        _dm(root).setup("validate")
    message = str(err.value)
    assert image in message and label in message and label.replace("_labelIds", "_labelTrainIds") in message


def _edit_label(path: str, value: int) -> None:
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    label[3, 4] = value
    assert cv2.imwrite(path, label)


def test_label_id_out_of_range_names_file_and_value(demo, tmp_path):
    root = _copy(demo, tmp_path)
    dm = _dm(root)
    dm.setup("validate")
    path = dm.datasets["val"].labels[1]
    _edit_label(path, 40)
    with pytest.raises(ValueError, match=rf"{re.escape(path)} holds value\(s\) 40 that are not Cityscapes label ids"):
        dm.datasets["val"][1]


def test_train_id_out_of_range_names_file_and_value(demo, tmp_path):
    root = _copy(demo, tmp_path)
    image, label_ids = list_pairs(root, "val")[0]
    train_ids = label_paths(root, "val", image)[0]
    trainid_label = ID_TO_TRAINID[cv2.imread(label_ids, cv2.IMREAD_UNCHANGED)]
    trainid_label[0, 0] = 19
    cv2.imwrite(str(train_ids), trainid_label)
    dataset = CityscapesSegmentation(list_pairs(root, "val"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(train_ids))} holds value\(s\) 19 that are not Cityscapes trainIds"):
        dataset[0]


def test_label_format_and_size_mismatch(demo, tmp_path):
    root = _copy(demo, tmp_path)
    image, label = list_pairs(root, "val")[0]
    cv2.imwrite(label, np.zeros((H, W, 3), np.uint8))  # a colour PNG is not a label map
    with pytest.raises(ValueError, match=rf"label {re.escape(label)} must be a single-channel 8-bit PNG"):
        CityscapesSegmentation(list_pairs(root, "val"))[0]
    cv2.imwrite(label, np.full((H // 2, W // 2), 7, np.uint8))
    with pytest.raises(ValueError) as err:
        CityscapesSegmentation(list_pairs(root, "val"))[0]
    message = str(err.value)
    assert label in message and image in message and f"({H // 2}, {W // 2})" in message and f"({H}, {W})" in message


def test_crop_that_can_never_fit_is_rejected_at_construction(demo):
    with pytest.raises(ValueError, match=r"data.image_size .* can never fit.*data.scale"):
        _dm(demo, image_size=(200, 64), scale=(W, H), ratio_range=(0.5, 2.0))  # max height 128
    _dm(demo, image_size=(128, 256), scale=(W, H), ratio_range=(0.5, 2.0))  # exactly fits
    with pytest.raises(ValueError, match="data.ratio_range"):
        _dm(demo, ratio_range=(2.0, 1.0))


def test_missing_root_split_or_images(demo, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data root .*nope does not exist \(data.root"):
        _dm(tmp_path / "nope").setup("fit")
    root = _copy(demo, tmp_path)
    shutil.rmtree(root / "leftImg8bit" / "val")
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val does not exist"):
        _dm(root).setup("fit")
    (root / "leftImg8bit" / "val" / "valville").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val holds no \*_leftImg8bit.png files"):
        _dm(root).setup("validate")


def test_train_ids_converter_writes_what_the_loader_maps(demo, tmp_path):
    from datamodules.cityscapes_train_ids import main as convert

    root = copy_root(demo, tmp_path)
    labels = sorted((root / "gtFine").rglob(f"*{LABEL_IDS_SUFFIX}"))
    assert labels  # the converter has files to convert
    assert convert([str(root)]) == 0
    for source in labels:
        target = source.with_name(source.name.replace(LABEL_IDS_SUFFIX, "_gtFine_labelTrainIds.png"))
        assert np.array_equal(read_label(target), read_label(source))
    assert list_pairs(root, "val")[0][1].endswith("_gtFine_labelTrainIds.png")  # now preferred by the loader
    assert convert([str(root), "--splits", "test"]) == 2  # no gtFine/test: named, not a crash
