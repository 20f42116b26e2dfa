"""ImageNet-layout classification data: ``root/{train,val}/<wnid>/*.JPEG``, or any folder of that shape.

Without a ``root`` the embedded demo set (:func:`datamodules.demo.classification_demo`) is
generated once into the cache folder and used, so a run works on a fresh machine.

Pipelines (albumentations):
- train: RandomResizedCrop(image_size, crop_scale) + horizontal flip + normalize;
- val/test: resize the shorter side to ``image_size / val_crop_ratio`` (256 for 224), center crop.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import albumentations as A
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from .demo import CLASSIFICATION_DEMO_VERSION, classification_demo
from .split_loaders import SplitDataModule
from .image_folder import ImageFolder, ImageList, SeedPerStepCompose, find_classes, image_hw, list_images, list_samples

__all__ = ["ImageNetDataModule", "IMAGENET_MEAN", "IMAGENET_STD", "train_transform", "eval_transform"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> A.Compose:
    """RandomResizedCrop + horizontal flip + normalize → float tensor ``(3, H, W)``."""
    return SeedPerStepCompose([
        A.RandomResizedCrop(size=image_hw(size), scale=tuple(scale)),
        A.HorizontalFlip(p=0.5),
        A.Normalize(mean=mean, std=std),
        ToTensorV2(),
    ])


def eval_transform(
    size: int | tuple[int, int],
    crop_ratio: float = 0.875,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> A.Compose:
    """Resize the shorter side to ``max(H, W) / crop_ratio``, center crop ``(H, W)``, normalize."""
    h, w = image_hw(size)
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"val_crop_ratio must be in (0, 1], got {crop_ratio}")
    return SeedPerStepCompose([
        A.SmallestMaxSize(max_size=int(round(max(h, w) / crop_ratio))),
        A.CenterCrop(height=h, width=w),
        A.Normalize(mean=mean, std=std),
        ToTensorV2(),
    ])


class ImageNetDataModule(SplitDataModule):
    """Class-per-folder classification data.

    Batches are ``(images (N, 3, H, W) float, labels (N,) int64)``; predict batches are
    ``(images, paths)``.

    Args:
        root: dataset root holding ``train/`` and ``val/``; ``None`` uses the embedded demo set.
        image_size: crop size; the classification CLI sets it to the model's input size.
        batch_size: per-device batch size.
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        crop_scale: RandomResizedCrop scale range.
        val_crop_ratio: center-crop fraction for evaluation (0.875: resize 256, crop 224).
        test_split: split used by ``test`` (ImageNet's test labels are not public: ``val``).
        predict_root: folder of images (searched recursively) for ``predict``; default the test split.
        skip_corrupt: skip unreadable images (logged and counted) instead of stopping with an error.
        mean, std: normalization.
        seed: seed of the training order and augmentation, a function of ``(seed, epoch)``
            (:class:`SeededSampler`); the CLI sets it to ``seed_everything``.
    """

    data_kind = "image_folder_classification"
    demo = (classification_demo, CLASSIFICATION_DEMO_VERSION)

    def __init__(
        self,
        root: Optional[str] = None,
        image_size: int | tuple[int, int] = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        val_crop_ratio: float = 0.875,
        test_split: str = "val",
        predict_root: Optional[str] = None,
        skip_corrupt: bool = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.image_size = image_hw(image_size)
        self.batch_size = self.val_batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.crop_scale = crop_scale
        self.val_crop_ratio = val_crop_ratio
        self.test_split = test_split
        self.predict_root = predict_root
        self.skip_corrupt = skip_corrupt
        self.mean, self.std = mean, std
        self.seed = seed
        self._classes: Optional[list[str]] = None
        self.datasets: dict[str, Dataset] = {}
        self._check_loader_settings()
        eval_transform(self.image_size, val_crop_ratio)  # validate the arguments now, not mid-run

    # ------------------------------------------------------------------ layout
    @property
    def data_root(self) -> Path:
        """The dataset root; the demo set is generated here on first use when ``root`` is None."""
        return Path(self.root) if self.root is not None else classification_demo()

    @property
    def classes(self) -> list[str]:
        """Class names (sorted folder names of ``train/``, or of ``val/`` when there is no train split)."""
        if self._classes is None:
            root = self.data_root
            if not root.is_dir():
                raise FileNotFoundError(f"data root {root} does not exist (data.root)")
            split = "train" if (root / "train").is_dir() else self.test_split
            if not (root / split).is_dir():
                raise FileNotFoundError(f"data root {root} has neither train/ nor {self.test_split}/ (data.root)")
            self._classes = find_classes(root / split)
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """:meth:`SplitDataModule.describe` with the ``classes``."""
        return {**super().describe(), "classes": self.classes}

    def calibration_set(self) -> Dataset:
        return self._split("train", train=False)

    def prepare_data(self) -> None:
        self.data_root  # generates the demo set once, on one process per node

    def _split(self, split: str, train: bool) -> ImageFolder:
        samples = list_samples(self.data_root / split, self.classes)
        transform = (
            train_transform(self.image_size, self.crop_scale, self.mean, self.std)
            if train else eval_transform(self.image_size, self.val_crop_ratio, self.mean, self.std)
        )
        log.info("%s split: %d images in %d classes from %s", split, len(samples), self.num_classes, self.data_root / split)
        return ImageFolder(samples, transform, self.skip_corrupt, drop_corrupt=not train)

    def setup(self, stage: Optional[str] = None) -> None:
        # Every folder is listed and checked here, before the first step.
        if stage in ("fit", None):
            self.datasets["train"] = self._split("train", train=True)
        if stage in ("fit", "validate", None):
            self.datasets["val"] = self._split("val", train=False)
        if stage in ("test", None):
            self.datasets["test"] = self._split(self.test_split, train=False)
        if stage in ("predict", None):
            folder = Path(self.predict_root) if self.predict_root else self.data_root / self.test_split
            transform = eval_transform(self.image_size, self.val_crop_ratio, self.mean, self.std)
            self.datasets["predict"] = ImageList(list_images(folder), transform, self.skip_corrupt)
