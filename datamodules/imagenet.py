"""ImageNet-layout classification data: ``root/{train,val}/<wnid>/*.JPEG``, or any folder of that shape.

Without a ``root`` the embedded demo set (:func:`datamodules.demo.classification_demo`) is
generated once into the cache folder and used, so a run works on a fresh machine.

Pipelines (albumentations), in timm's order:
- train: RandomResizedCrop(image_size, crop_scale) + horizontal flip [+ RandAugment] + normalize
  [+ random erasing] (:mod:`datamodules.augment`; both off by default);
- val/test: resize the shorter side to ``image_size / val_crop_ratio`` (256 for 224), center crop.
Resizing and RandAugment's geometric ops use ``interpolation`` (bilinear by default).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from .augment import ERASING_MODES, RandAugment, RandomErasing, fill_colour, parse_rand_augment
from .demo import CLASSIFICATION_DEMO_VERSION, classification_demo
from .split_loaders import SplitDataModule
from .image_folder import ImageFolder, ImageList, SeedPerStepCompose, find_classes, image_hw, list_images, list_samples

__all__ = ["ImageNetDataModule", "IMAGENET_MEAN", "IMAGENET_STD", "train_transform", "eval_transform"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


Interpolation = Literal["bilinear", "bicubic"]
ErasingMode = Literal["const", "rand", "pixel"]
_CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def _cv2_interpolation(interpolation: str) -> int:
    if interpolation not in _CV2_INTERPOLATION:
        raise ValueError(f"data.interpolation must be one of {list(_CV2_INTERPOLATION)}, got {interpolation!r}")
    return _CV2_INTERPOLATION[interpolation]


def train_transform(
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    *,
    interpolation: Interpolation = "bilinear",
    rand_augment: Optional[str] = None,
    random_erasing: float = 0.0,
    erasing_mode: ErasingMode = "pixel",
    erasing_count: int = 1,
) -> A.Compose:
    """RandomResizedCrop + horizontal flip [+ RandAugment] + normalize [+ random erasing] → float
    tensor ``(3, H, W)``.

    ``rand_augment``: timm's string (``rand-m9-mstd0.5-inc1``), on the ``uint8`` crop with fill
    ``round(255 * mean)``; ``random_erasing``: probability of timm's random erasing on the
    normalized image, with ``erasing_mode`` and 1..``erasing_count`` boxes. Each step draws from its
    own generator, seeded per sample by :class:`SeedPerStepCompose`.
    """
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=image_hw(size), scale=tuple(scale), interpolation=_cv2_interpolation(interpolation)),
        A.HorizontalFlip(p=0.5),
    ]
    if rand_augment is not None:
        steps.append(RandAugment(rand_augment, fill=fill_colour(mean), interpolation=interpolation))
    steps.append(A.Normalize(mean=mean, std=std))
    if random_erasing > 0:
        steps.append(RandomErasing(random_erasing, mode=erasing_mode, max_count=erasing_count))
    steps.append(ToTensorV2())
    return SeedPerStepCompose(steps)


def eval_transform(
    size: int | tuple[int, int],
    crop_ratio: float = 0.875,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    *,
    interpolation: Interpolation = "bilinear",
) -> A.Compose:
    """Resize the shorter side to ``max(H, W) / crop_ratio``, center crop ``(H, W)``, normalize."""
    h, w = image_hw(size)
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"val_crop_ratio must be in (0, 1], got {crop_ratio}")
    return SeedPerStepCompose([
        A.SmallestMaxSize(max_size=int(round(max(h, w) / crop_ratio)), interpolation=_cv2_interpolation(interpolation)),
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
        rand_augment: timm's RandAugment string applied to training crops, e.g.
            ``rand-m9-mstd0.5-inc1`` (:class:`datamodules.augment.RandAugment`); None: off.
        random_erasing: probability of timm's random erasing of a training image (after
            normalization; :class:`datamodules.augment.RandomErasing`); 0: off.
        erasing_mode: fill of an erased box: ``pixel`` per-pixel N(0, 1), ``rand`` per-channel
            N(0, 1), ``const`` 0.
        erasing_count: boxes per erased image, uniform in ``[1, erasing_count]``.
        interpolation: ``bilinear`` or ``bicubic`` for RandomResizedCrop, the evaluation resize and
            RandAugment's geometric ops.
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
        rand_augment: Optional[str] = None,
        random_erasing: float = 0.0,
        erasing_mode: ErasingMode = "pixel",
        erasing_count: int = 1,
        interpolation: Interpolation = "bilinear",
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
        self.rand_augment = rand_augment
        self.random_erasing = random_erasing
        self.erasing_mode = erasing_mode
        self.erasing_count = erasing_count
        self.interpolation = interpolation
        self._check_loader_settings()
        self._check_augment_settings()
        # build both pipelines now so that a bad argument fails here, not mid-run
        eval_transform(self.image_size, val_crop_ratio, interpolation=interpolation)
        self._train_transform()

    def _check_augment_settings(self) -> None:
        """Raise ValueError naming the ``data.`` option of a bad augmentation argument."""
        if self.rand_augment is not None:
            parse_rand_augment(self.rand_augment, "data.rand_augment")
        p = self.random_erasing
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"data.random_erasing must be a probability in [0, 1], got {p!r}")
        if self.erasing_mode not in ERASING_MODES:
            raise ValueError(f"data.erasing_mode must be one of {list(ERASING_MODES)}, got {self.erasing_mode!r}")
        n = self.erasing_count
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"data.erasing_count must be an integer >= 1, got {n!r}")
        _cv2_interpolation(self.interpolation)

    def _train_transform(self) -> A.Compose:
        return train_transform(
            self.image_size, self.crop_scale, self.mean, self.std, interpolation=self.interpolation,
            rand_augment=self.rand_augment, random_erasing=self.random_erasing,
            erasing_mode=self.erasing_mode, erasing_count=self.erasing_count,
        )

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
            self._train_transform() if train
            else eval_transform(self.image_size, self.val_crop_ratio, self.mean, self.std, interpolation=self.interpolation)
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
            transform = eval_transform(self.image_size, self.val_crop_ratio, self.mean, self.std,
                                       interpolation=self.interpolation)
            self.datasets["predict"] = ImageList(list_images(folder), transform, self.skip_corrupt)
