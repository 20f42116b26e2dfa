"""Cityscapes semantic segmentation (fine annotations, 19 train classes) in the official layout.

``root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with labels in
``root/gtFine/<split>/<city>/``: ``*_gtFine_labelTrainIds.png`` (mmseg's converter output) when
present, else ``*_gtFine_labelIds.png`` mapped through :data:`ID_TO_TRAINID` on load. Without a
``root`` the embedded demo set (:func:`datamodules.demo.cityscapes_demo`) is generated once and used.

Pipelines follow mmseg 1.x ``configs/_base_/datasets/cityscapes.py`` (albumentations):

- train: :class:`RandomRescale` (``RandomResize(scale, ratio_range, keep_ratio=True)``) →
  :class:`CatMaxRatioCrop` (``RandomCrop(crop_size, cat_max_ratio)``) → horizontal flip →
  :class:`PhotoMetricDistortion` → normalize → :class:`PadTo` the crop size (image 0 *after*
  normalization, label 255: mmseg's ``SegDataPreProcessor`` normalizes, then pads) → tensors;
- val/test: normalize only; the full image and its full-resolution label.

Every custom step draws from its own albumentations generator, and :class:`SeedPerStepCompose`
gives each step an independent seed, so a pipeline is reproducible from one seed.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from .demo import CITYSCAPES_DEMO_VERSION, cityscapes_demo
from .split_loaders import SplitDataModule
from .image_folder import CorruptImageError, ImageList, SeedPerStepCompose, _ImageDataset, image_hw, list_images, read_image
from .imagenet import IMAGENET_MEAN, IMAGENET_STD
from .seeded_sampler import SampleKey

__all__ = [
    "CLASSES",
    "PALETTE",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "MAX_LABEL_ID",
    "ID_TO_TRAINID",
    "IMAGE_SUFFIX",
    "LABEL_TRAINIDS_SUFFIX",
    "LABEL_IDS_SUFFIX",
    "label_paths",
    "list_pairs",
    "read_label",
    "rescale_size",
    "RandomRescale",
    "CatMaxRatioCrop",
    "PadTo",
    "PhotoMetricDistortion",
    "train_transform",
    "eval_transform",
    "CityscapesSegmentation",
    "CityscapesDataModule",
]

log = logging.getLogger(__name__)

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255
# Largest id of cityscapesscripts/helpers/labels.py (license plate, -1, is never drawn).
MAX_LABEL_ID = 33
# Label ids kept for training, in trainId order (cityscapesscripts/helpers/labels.py).
_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def _id_to_trainid() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(_TRAIN_LABEL_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)
    lut.setflags(write=False)
    return lut


# ``ID_TO_TRAINID[label_ids]`` → trainIds. Entries above MAX_LABEL_ID are 255 too, but such values
# are rejected by :func:`read_label` before the lookup: they mean a wrong file, not "ignore".
ID_TO_TRAINID = _id_to_trainid()

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_TRAINIDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
_LABEL_KINDS = ("auto", "labelTrainIds", "labelIds")


# --------------------------------------------------------------------------- files
def label_paths(root: str | os.PathLike, split: str, image: str | os.PathLike) -> tuple[Path, Path]:
    """``(labelTrainIds path, labelIds path)`` of a ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` image."""
    root, image = Path(root), Path(image)
    relative = image.relative_to(root / "leftImg8bit" / split)
    stem = relative.name[: -len(IMAGE_SUFFIX)]
    folder = root / "gtFine" / split / relative.parent
    return folder / (stem + LABEL_TRAINIDS_SUFFIX), folder / (stem + LABEL_IDS_SUFFIX)


def list_pairs(root: str | os.PathLike, split: str, require_labels: bool = True) -> list[tuple[str, Optional[str]]]:
    """``(image, label)`` paths of a split, sorted by image path (as mmseg does).

    The label is ``*_gtFine_labelTrainIds.png`` when it exists, else ``*_gtFine_labelIds.png``.
    With ``require_labels=False`` an image without either gets ``None`` (an all-ignore label), for
    image-only folders; otherwise every such image is an error naming it and both paths tried.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} does not exist (data.root; expected {root}/leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} "
            f"and {root}/gtFine/<split>/<city>/*{LABEL_TRAINIDS_SUFFIX} or *{LABEL_IDS_SUFFIX})"
        )
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Cityscapes image folder {image_dir} does not exist (expected {image_dir}/<city>/*{IMAGE_SUFFIX})")
    images = sorted(str(p) for p in image_dir.rglob("*" + IMAGE_SUFFIX) if p.is_file() and not p.name.startswith("."))
    if not images:
        raise FileNotFoundError(f"Cityscapes image folder {image_dir} holds no *{IMAGE_SUFFIX} files")
    pairs: list[tuple[str, Optional[str]]] = []
    missing = []
    for image in images:
        train_ids, label_ids = label_paths(root, split, image)
        if train_ids.is_file():
            pairs.append((image, str(train_ids)))
        elif label_ids.is_file():
            pairs.append((image, str(label_ids)))
        elif require_labels:
            missing.append(f"image {image} (looked for {train_ids} and {label_ids})")
        else:
            pairs.append((image, None))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(images)} images of {image_dir} have no label file: "
            + "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        )
    return pairs


def _label_kind(path: str, kind: str) -> str:
    if kind != "auto":
        return kind
    if path.endswith(LABEL_TRAINIDS_SUFFIX):
        return "labelTrainIds"
    if path.endswith(LABEL_IDS_SUFFIX):
        return "labelIds"
    raise ValueError(
        f"cannot tell whether label {path} holds Cityscapes label ids or trainIds from its name "
        f"(*{LABEL_IDS_SUFFIX} or *{LABEL_TRAINIDS_SUFFIX}); pass label_kind='labelIds' or 'labelTrainIds'"
    )


def _values(values: np.ndarray) -> str:
    values = np.unique(values)
    return ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")


def read_label(path: str | os.PathLike, kind: str = "auto") -> np.ndarray:
    """Decode a label PNG into trainIds: ``uint8 (H, W)`` with values 0..18 or 255.

    ``kind``: ``"labelIds"`` (Cityscapes ids 0..33, mapped), ``"labelTrainIds"`` (kept as is) or
    ``"auto"`` (from the file-name suffix). Any other value in the file raises ValueError naming it.
    """
    if kind not in _LABEL_KINDS:
        raise ValueError(f"label kind must be one of {', '.join(_LABEL_KINDS)}, got {kind!r}")
    path = str(path)
    kind = _label_kind(path, kind)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise CorruptImageError(f"cannot read label {path}: {exc}") from exc
    label = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if label is None:
        raise CorruptImageError(f"cannot decode label {path} ({data.size} bytes): corrupt, truncated or not an image")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(
            f"label {path} must be a single-channel 8-bit PNG of Cityscapes {kind}, "
            f"got shape {label.shape} dtype {label.dtype}"
        )
    if kind == "labelIds":
        bad = label > MAX_LABEL_ID
        if bad.any():
            raise ValueError(
                f"label {path} holds value(s) {_values(label[bad])} that are not Cityscapes label ids "
                f"(0..{MAX_LABEL_ID}); is it a labelIds file of another dataset or label set?"
            )
        return ID_TO_TRAINID[label]
    bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"label {path} holds value(s) {_values(label[bad])} that are not Cityscapes trainIds "
            f"(0..{NUM_CLASSES - 1} or {IGNORE_INDEX})"
        )
    return label


# --------------------------------------------------------------------------- transforms
def rescale_size(width: int, height: int, scale: Sequence[float]) -> tuple[int, int]:
    """``(w, h)`` of an image rescaled, ratio kept, to fit within ``scale`` (mmcv ``rescale_size``).

    The factor is ``min(max(scale) / long side, min(scale) / short side)``.
    """
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


class RandomRescale(A.DualTransform):
    """mmseg ``RandomResize(scale, ratio_range, keep_ratio=True)``.

    ``ratio ~ U(ratio_range)``; the image is rescaled, aspect kept, to fit within
    ``(int(scale[0] * ratio), int(scale[1] * ratio))``: bilinear for the image, nearest for the label.
    """

    def __init__(self, scale: Sequence[int] = (2048, 1024), ratio_range: Sequence[float] = (0.5, 2.0), p: float = 1.0):
        super().__init__(p=p)
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.random_generator.uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return {"size": rescale_size(w, h, target)}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return img if img.shape[1::-1] == size else cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return mask if mask.shape[1::-1] == size else cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range")


class CatMaxRatioCrop(A.DualTransform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``; ``crop_size`` is ``(h, w)``.

    A crop offset is drawn uniformly; while the crop's largest class is ``>= cat_max_ratio`` of its
    non-ignored pixels or fewer than 2 classes are present, up to ``max_tries`` new offsets are
    drawn (the last one is kept). An image smaller than the crop is kept whole along that side
    (:class:`PadTo` pads it later). Needs the label: call with ``image=..., mask=...``.
    """

    def __init__(self, crop_size: Sequence[int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                 max_tries: int = 10, p: float = 1.0):
        super().__init__(p=p)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    @property
    def targets_as_params(self) -> list[str]:
        return ["mask"]

    def _bbox(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = self.crop_size
        y = int(self.random_generator.integers(0, max(h - ch, 0) + 1))
        x = int(self.random_generator.integers(0, max(w - cw, 0) + 1))
        return y, min(y + ch, h), x, min(x + cw, w)

    def _acceptable(self, label: np.ndarray) -> bool:
        counts = np.bincount(label.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        label = data["mask"]
        h, w = label.shape[:2]
        bbox = self._bbox(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                y0, y1, x0, x1 = bbox
                if self._acceptable(label[y0:y1, x0:x1]):
                    break
                bbox = self._bbox(h, w)
        return {"bbox": bbox}

    def apply(self, img: np.ndarray, bbox: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        y0, y1, x0, x1 = bbox
        return img[y0:y1, x0:x1]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_size", "cat_max_ratio", "ignore_index", "max_tries")


class PadTo(A.DualTransform):
    """Pad at the bottom and right to at least ``size`` ``(h, w)``: image ``pad_val``, label ``seg_pad_val``."""

    def __init__(self, size: Sequence[int], pad_val: float = 0.0, seg_pad_val: int = IGNORE_INDEX, p: float = 1.0):
        super().__init__(p=p)
        self.size = (int(size[0]), int(size[1]))
        self.pad_val = pad_val
        self.seg_pad_val = seg_pad_val

    def _pad(self, array: np.ndarray, value: float) -> np.ndarray:
        dh, dw = max(self.size[0] - array.shape[0], 0), max(self.size[1] - array.shape[1], 0)
        if not dh and not dw:
            return array
        widths = ((0, dh), (0, dw)) + ((0, 0),) * (array.ndim - 2)
        return np.pad(array, widths, constant_values=value)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return self._pad(img, self.pad_val)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return self._pad(mask, self.seg_pad_val)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "pad_val", "seg_pad_val")


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg ``PhotoMetricDistortion`` on an RGB ``uint8`` image; each step with probability 0.5.

    brightness ``+U(-delta, delta)`` → contrast ``*U(range)`` (before or after the colour steps, at
    random) → saturation ``*U(range)`` and hue ``+randint(-delta, delta) mod 180`` in OpenCV HSV.
    Unlike mmseg, saturation and hue share one HSV round trip (a rounding-level difference).
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18, p: float = 1.0):
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def get_params(self) -> dict[str, Any]:
        r = self.random_generator
        return {
            "beta": r.uniform(-self.brightness_delta, self.brightness_delta) if r.random() < 0.5 else None,
            "contrast_first": bool(r.random() < 0.5),
            "alpha": r.uniform(*self.contrast_range) if r.random() < 0.5 else None,
            "saturation": r.uniform(*self.saturation_range) if r.random() < 0.5 else None,
            "hue": int(r.integers(-self.hue_delta, self.hue_delta + 1)) if r.random() < 0.5 else None,
        }

    def apply(self, img: np.ndarray, beta: Optional[float] = None, contrast_first: bool = True,
              alpha: Optional[float] = None, saturation: Optional[float] = None, hue: Optional[int] = None,
              **params: Any) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"PhotoMetricDistortion expects an RGB uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
        if beta is not None:
            img = _convert(img, beta=beta)
        if contrast_first and alpha is not None:
            img = _convert(img, alpha=alpha)
        if saturation is not None or hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            if saturation is not None:
                hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
            if hue is not None:
                hsv[..., 0] = (hsv[..., 0].astype(np.int32) + hue) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and alpha is not None:
            img = _convert(img, alpha=alpha)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def train_transform(
    crop_size: int | tuple[int, int],
    scale: tuple[int, int] = (2048, 1024),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> A.Compose:
    """mmseg's Cityscapes train pipeline; called as ``t(image=rgb_uint8, mask=trainIds_uint8)``.

    Returns ``image`` float tensor ``(3, h, w)`` and ``mask`` uint8 tensor ``(h, w)`` with
    ``(h, w) = crop_size``; padded pixels are 0 in the normalized image and 255 in the label.
    ``scale`` is ``(w, h)``, as in mmseg.
    """
    crop = image_hw(crop_size)
    return SeedPerStepCompose([
        RandomRescale(scale, ratio_range),
        CatMaxRatioCrop(crop, cat_max_ratio),
        A.HorizontalFlip(p=0.5),
        PhotoMetricDistortion(),
        A.Normalize(mean=mean, std=std),
        PadTo(crop, pad_val=0.0, seg_pad_val=IGNORE_INDEX),  # after Normalize, as in SegDataPreProcessor
        ToTensorV2(),
    ])


def eval_transform(
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> A.Compose:
    """Normalize only: ``image`` float tensor ``(3, H, W)`` at full resolution (``mask`` kept as is)."""
    return SeedPerStepCompose([A.Normalize(mean=mean, std=std), ToTensorV2()])


# --------------------------------------------------------------------------- dataset
class CityscapesSegmentation(_ImageDataset):
    """``(image float (3, H, W), label int64 (H, W))`` samples; labels are trainIds (0..18, 255 = ignore).

    Args:
        pairs: ``(image path, label path or None)`` (see :func:`list_pairs`); ``None`` gives an
            all-255 label.
        transform: albumentations pipeline called as ``transform(image=rgb_uint8, mask=trainIds_uint8)``;
            ``None`` returns the uint8 image ``(3, H, W)`` and the label unchanged.
        label_kind: ``"auto"`` (from the label file name), ``"labelIds"`` or ``"labelTrainIds"``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, Optional[str]]],
        transform: Optional[Callable[..., dict]] = None,
        label_kind: str = "auto",
    ) -> None:
        if label_kind not in _LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {', '.join(_LABEL_KINDS)}, got {label_kind!r}")
        super().__init__([image for image, _ in pairs], transform, skip_corrupt=False)
        self.labels = [label for _, label in pairs]
        self.label_kind = label_kind

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The RGB ``uint8 (H, W, 3)`` image and trainIds ``uint8 (H, W)`` label at ``index``, checked."""
        image_path, label_path = self.paths[index], self.labels[index]
        image = read_image(image_path)
        if label_path is None:
            return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        label = read_label(label_path, self.label_kind)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"label {label_path} has shape (H, W) {label.shape} but image {image_path} has "
                f"{image.shape[:2]}: image and label must have the same size"
            )
        return image, label

    def __getitem__(self, key: Union[int, SampleKey]) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(self._index(key))
        if self.transform is None:
            return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label).long()
        self._seed_transform()
        out = self.transform(image=image, mask=label)
        return out["image"], torch.as_tensor(out["mask"]).long()


# --------------------------------------------------------------------------- datamodule
class CityscapesDataModule(SplitDataModule):
    """Cityscapes fine-annotation semantic segmentation (19 classes, 255 = ignore).

    Batches: train ``(images (N, 3, h, w) float, labels (N, h, w) int64)`` with ``(h, w) =
    image_size``; val/test ``(images (N, 3, H, W), labels (N, H, W))`` at full resolution (images of
    one batch must share a size when ``val_batch_size > 1``); predict ``(images, paths)``.

    Args:
        root: dataset root holding ``leftImg8bit/`` and ``gtFine/``; ``None`` uses the embedded demo set.
        image_size: training crop ``(h, w)`` (an int: square). The segmentation CLI computes it from
            the model's input size (a RepMLP backbone is built for one input size).
        scale: ``(w, h)`` that images are rescaled to fit within, times a ratio from ``ratio_range``.
        ratio_range: random rescale ratio range.
        cat_max_ratio: crop retry rule: the largest class must cover less than this share of a crop.
        batch_size: per-device training batch size.
        val_batch_size: per-device batch size for val, test and predict.
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        test_split: split used by ``test`` (and ``predict`` without ``predict_root``); the labels of
            Cityscapes' ``test`` split are not public, so ``test`` there allows image-only folders.
        predict_root: folder of images (searched recursively) for ``predict``.
        mean, std: normalization (RGB, 0..1 units).
        seed: seed of the training order and augmentation, a function of ``(seed, epoch)``
            (:class:`SeededSampler`); the CLI sets it to ``seed_everything``.
    """

    data_kind = "cityscapes"
    demo = (cityscapes_demo, CITYSCAPES_DEMO_VERSION)

    def __init__(
        self,
        root: Optional[str] = None,
        image_size: int | tuple[int, int] = (512, 1024),
        scale: tuple[int, int] = (2048, 1024),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        test_split: str = "val",
        predict_root: Optional[str] = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.image_size = image_hw(image_size)
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.test_split = test_split
        self.predict_root = predict_root
        self.mean, self.std = mean, std
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}
        self._check_arguments()

    def _check_arguments(self) -> None:
        # Checked now, not in a worker mid-epoch.
        self._check_loader_settings()
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"data.ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if min(self.scale) <= 0 or min(self.image_size) <= 0:
            raise ValueError(f"data.scale {self.scale} and data.image_size {self.image_size} must be positive")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"data.cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        max_w, max_h = int(self.scale[0] * hi), int(self.scale[1] * hi)
        h, w = self.image_size
        if h > max_h or w > max_w:
            raise ValueError(
                f"data.image_size (crop h, w) = {self.image_size} can never fit: images are rescaled to fit "
                f"within data.scale (w, h) = {self.scale} x max(data.ratio_range) = {hi}, at most {max_w}x{max_h} "
                f"(w x h); lower data.image_size or raise data.scale"
            )

    # ------------------------------------------------------------------ metadata
    @property
    def data_root(self) -> Path:
        """The dataset root; the demo set is generated here on first use when ``root`` is None."""
        return Path(self.root) if self.root is not None else cityscapes_demo()

    @property
    def classes(self) -> list[str]:
        return list(CLASSES)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def describe(self) -> dict[str, Any]:
        """:meth:`SplitDataModule.describe` with the ``classes`` (trainId order)."""
        return {**super().describe(), "classes": self.classes}

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """RGB colour of each trainId."""
        return list(PALETTE)

    @property
    def ignore_index(self) -> int:
        return IGNORE_INDEX

    def prepare_data(self) -> None:
        self.data_root  # generates the demo set once, on one process per node

    def _split(self, split: str, train: bool, require_labels: bool = True) -> CityscapesSegmentation:
        pairs = list_pairs(self.data_root, split, require_labels)
        transform = (
            train_transform(self.image_size, self.scale, self.ratio_range, self.cat_max_ratio, self.mean, self.std)
            if train else eval_transform(self.mean, self.std)
        )
        log.info("%s split: %d images from %s", split, len(pairs), self.data_root / "leftImg8bit" / split)
        return CityscapesSegmentation(pairs, transform)

    def calibration_set(self) -> CityscapesSegmentation:
        return self._split("train", train=False)

    def setup(self, stage: Optional[str] = None) -> None:
        # Every folder is listed and every image paired with its label here, before the first step.
        if stage in ("fit", None):
            self.datasets["train"] = self._split("train", train=True)
        if stage in ("fit", "validate", None):
            self.datasets["val"] = self._split("val", train=False)
        if stage in ("test", None):
            self.datasets["test"] = self._split(self.test_split, train=False, require_labels=self.test_split != "test")
        if stage in ("predict", None):
            if self.predict_root:
                paths = list_images(self.predict_root)
            else:
                paths = [image for image, _ in list_pairs(self.data_root, self.test_split, require_labels=False)]
            self.datasets["predict"] = ImageList(paths, eval_transform(self.mean, self.std), skip_corrupt=False)
