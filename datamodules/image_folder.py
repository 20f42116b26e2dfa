"""Class-per-folder image datasets (the ImageNet layout) with errors that name the file or folder.

``split/<class>/<image>``: classes are the sub-folder names in sorted order (ImageNet's wnid
order). Images are decoded with OpenCV into RGB ``uint8`` arrays; an unreadable or corrupt file
raises :class:`CorruptImageError` naming it, or, with ``skip_corrupt=True``, is skipped and counted
in a warning: a training set replaces it by the next readable sample (batches keep their size),
while evaluation and prediction sets (``drop_corrupt``) drop it, so that no image is counted or
written twice; :func:`collate_readable` leaves dropped samples out of the batch.
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
from torch.utils.data import Dataset, default_collate, get_worker_info

from .seeded_sampler import SampleKey

__all__ = [
    "IMG_EXTENSIONS",
    "CorruptImageError",
    "SeedPerStepCompose",
    "image_hw",
    "decode_image",
    "read_image",
    "find_classes",
    "list_samples",
    "list_images",
    "ImageFolder",
    "ImageList",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class CorruptImageError(OSError):
    """An image file that cannot be read or decoded."""


def image_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` from one int (square) or a pair: the image and crop sizes of the datamodules."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def decode_image(data: bytes | np.ndarray) -> Optional[np.ndarray]:
    """Encoded image bytes → RGB ``uint8`` ``(H, W, 3)`` (grayscale is expanded), or None when they
    do not decode (empty, truncated or not an image); callers raise with their own source."""
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not buffer.size:
        return None
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` into an RGB ``uint8`` array of shape ``(H, W, 3)`` (grayscale is expanded)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise CorruptImageError(f"cannot read image {path}: {exc}") from exc
    image = decode_image(data)
    if image is None:
        raise CorruptImageError(f"cannot decode image {path} ({data.size} bytes): corrupt, truncated or not an image")
    return image


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def find_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class-folder names of ``split_dir``; a clear error if it is missing or has none."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {split_dir} does not exist (expected {split_dir}/<class>/<images>)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"dataset folder {split_dir} has no class folders (expected {split_dir}/<class>/<images>)")
    return classes


def list_samples(split_dir: str | os.PathLike, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` for every image of ``split_dir/<class>/``, sorted for reproducibility.

    Every class of ``classes`` must have a folder with at least one image, and the folder must
    hold no other classes; otherwise one error lists every problem.
    """
    split_dir = Path(split_dir)
    found = find_classes(split_dir)
    problems = []
    missing = sorted(set(classes) - set(found))
    extra = sorted(set(found) - set(classes))
    if missing:
        problems.append(f"missing class folder(s): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if extra:
        problems.append(f"class folder(s) not in the class list: {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        files = sorted(e.path for e in os.scandir(folder) if e.is_file() and _is_image(e.name))
        if not files:
            empty.append(str(folder))
        samples.extend((f, index) for f in files)
    if empty:
        problems.append(f"empty class folder(s) (no {'/'.join(IMG_EXTENSIONS)} files): {', '.join(empty[:10])}")
    if problems:
        raise ValueError(f"dataset folder {split_dir}: " + "; ".join(problems))
    return samples


def list_images(folder: str | os.PathLike) -> list[str]:
    """Every image file under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and _is_image(p.name))
    if not files:
        raise FileNotFoundError(f"image folder {folder} holds no {'/'.join(IMG_EXTENSIONS)} files")
    return files


class SeedPerStepCompose(A.Compose):
    """``A.Compose`` whose ``set_random_seed(seed)`` gives every step its own seed derived from ``seed``.

    albumentations 2.x gives every step the *same* seed, so their random streams are identical
    and, e.g., the flip decision and the brightness offset are correlated. Here the step seeds
    come from ``numpy.random.SeedSequence(seed).spawn``.
    """

    def set_random_seed(self, seed: Optional[int]) -> None:
        super().set_random_seed(seed)
        if seed is None:
            return
        for transform, child in zip(self.transforms, np.random.SeedSequence(seed).spawn(len(self.transforms))):
            if hasattr(transform, "set_random_seed"):
                transform.set_random_seed(int(child.generate_state(1)[0]))


class _ImageDataset(Dataset):
    """Shared decoding, corrupt-file policy and per-worker augmentation seeding.

    ``paths`` names the samples (file paths, or any per-sample label used in messages);
    :meth:`_read` decodes one.
    """

    def __init__(self, paths: Sequence[str], transform: Optional[Callable[..., dict]], skip_corrupt: bool,
                 drop_corrupt: bool = False) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.drop_corrupt = drop_corrupt
        self.skipped = 0
        self._seed_key: Any = None
        self._sample_seed: Optional[int] = None

    def __len__(self) -> int:
        return len(self.paths)

    def _index(self, key: Union[int, SampleKey]) -> int:
        """The sample index of a dataset key: an int, or a :class:`SampleKey` from the training
        sampler, whose seed then fixes this sample's augmentation."""
        if isinstance(key, SampleKey):
            self._sample_seed = key.seed
            return key.index
        self._sample_seed = None
        return key

    def _seed_transform(self) -> None:
        # albumentations draws from its own generator. A training sample carries its own seed
        # (SeededSampler); other keys seed once per worker from the worker's torch seed.
        if self.transform is None or not hasattr(self.transform, "set_random_seed"):
            return
        if self._sample_seed is not None:
            self.transform.set_random_seed(self._sample_seed)
            self._seed_key = None
            return
        info = get_worker_info()
        key = (os.getpid(), info.id if info else None)
        if key != self._seed_key:
            seed = info.seed if info else torch.initial_seed()
            # seed_everything gives every DDP rank the same torch seed: mix the rank in
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self.transform.set_random_seed(int(np.random.SeedSequence([seed % 2**32, rank]).generate_state(1)[0]))
            self._seed_key = key

    def _read(self, i: int) -> np.ndarray:
        """Decode sample ``i`` into RGB ``uint8`` ``(H, W, 3)``; subclasses with other storage
        (RecordIO, pickled pairs) override this and raise :class:`CorruptImageError` naming the source."""
        return read_image(self.paths[i])

    def _load(self, index: int) -> tuple[int, Optional[np.ndarray]]:
        """The image at ``index``; with ``skip_corrupt``, for an unreadable one, the next readable
        one, or None with ``drop_corrupt``."""
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")  # ends iteration
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                return i, self._read(i)
            except CorruptImageError as exc:
                if not self.skip_corrupt:
                    raise
                self.skipped += 1
                log.warning("skip_corrupt: %s; %d image(s) skipped so far in this process", exc, self.skipped)
                if self.drop_corrupt:
                    return i, None
        raise CorruptImageError(f"no readable image among the {len(self.paths)} files of this dataset")

    def _transform(self, image: np.ndarray) -> Any:
        if self.transform is None:
            return torch.from_numpy(image).permute(2, 0, 1).contiguous()
        self._seed_transform()
        return self.transform(image=image)["image"]


class ImageFolder(_ImageDataset):
    """``(image, label)`` samples of a class-per-folder split.

    Args:
        samples: ``(path, class index)`` pairs (see :func:`list_samples`).
        transform: albumentations pipeline, called as ``transform(image=rgb_uint8)["image"]``.
        skip_corrupt: skip unreadable images (and log them) instead of raising: replaced by the next
            readable one, or, with ``drop_corrupt`` (evaluation), returned as None.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Optional[Callable[..., dict]] = None,
        skip_corrupt: bool = False,
        drop_corrupt: bool = False,
    ) -> None:
        super().__init__([p for p, _ in samples], transform, skip_corrupt, drop_corrupt)
        self.targets = [t for _, t in samples]

    def __getitem__(self, key: Union[int, SampleKey]) -> Optional[tuple[Any, int]]:
        i, image = self._load(self._index(key))
        return None if image is None else (self._transform(image), self.targets[i])


class ImageList(_ImageDataset):
    """``(image, path)`` samples of unlabeled images, for prediction (a corrupt one skipped with
    ``skip_corrupt`` is dropped: None)."""

    def __init__(self, paths: Sequence[str], transform: Optional[Callable[..., dict]], skip_corrupt: bool) -> None:
        super().__init__(paths, transform, skip_corrupt, drop_corrupt=True)

    def __getitem__(self, key: Union[int, SampleKey]) -> Optional[tuple[Any, str]]:
        i, image = self._load(self._index(key))
        return None if image is None else (self._transform(image), self.paths[i])


def collate_readable(samples: list[Any]) -> Any:
    """``default_collate`` of the samples that are not None (dropped corrupt images); None when
    none is left, which the tasks' evaluation and predict steps skip. Images of different sizes
    (a predict folder of mixed sizes) are an error that names them."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    images = [s[0] for s in kept if isinstance(s, tuple) and isinstance(s[0], torch.Tensor)]
    if len({tuple(t.shape) for t in images}) > 1:
        named = [f"{s[1]} ({'x'.join(map(str, s[0].shape[-2:]))})" for s in kept if isinstance(s[-1], str)]
        raise ValueError(
            f"images of different sizes in one batch cannot be stacked: {', '.join(named[:4]) or 'see the data'}; "
            "run with --data.val_batch_size 1, or bring the images to one size"
        )
    return default_collate(kept)
