"""Face recognition data: training identities and verification pairs, in insightface's layouts.

``root`` holds (insightface's ``faces_emore`` and friends)::

    root/train.rec, train.idx, property      # training set as insightface RecordIO, or
    root/train/<identity>/*.jpg|png          # training set as identity folders (``train_dir``)
    root/lfw.bin, cfp_fp.bin, agedb_30.bin   # verification sets as insightface .bin files, or
    root/<name>/pairs.txt + root/<name>/<person>/<person>_<NNNN>.jpg   # LFW-style pairs

RecordIO wins when both training forms are present. Faces are expected aligned at the model's
input size (112x112 for MobileFaceNet, 96x96 for FaceRes); other sizes are resized. Training
applies a horizontal flip; every image is normalized to [-1, 1] (``(x / 255 - 0.5) / 0.5``).

Without a ``root`` the embedded demo faces (:func:`datamodules.demo_faces.face_demo`) are
generated once and used. Validation and test evaluate every verification set of ``val_sets``
that is present, one dataloader each; batches are ``(images_a, images_b, issame, pair_index)``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset

from .demo_faces import FACE_DEMO_VERSION, face_demo
from .image_folder import ImageFolder, ImageList, SeedPerStepCompose, find_classes, image_hw, list_images, list_samples
from .recordio import FaceRecordDataset, read_property
from .split_loaders import SplitDataModule
from .verification_pairs import VerificationPairs, find_verification_sets, load_verification_set

__all__ = ["FaceDataModule", "face_transform", "VERIFICATION_SETS"]

log = logging.getLogger(__name__)

VERIFICATION_SETS = ("lfw", "cfp_fp", "agedb_30")
RECORD_FILES = ("train.rec", "train.idx", "property")


def face_transform(size: int | tuple[int, int], flip: bool) -> A.Compose:
    """Resize to ``size`` (a no-op for faces already aligned at it), optional flip, [-1, 1] → ``(3, H, W)``."""
    h, w = image_hw(size)
    steps: list[A.BasicTransform] = [A.Resize(h, w, interpolation=cv2.INTER_LINEAR)]
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps += [A.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), ToTensorV2()]
    return SeedPerStepCompose(steps)


class FaceDataModule(SplitDataModule):
    """Face identities for training, verification pairs for validation and test, folders for predict.

    Train batches are ``(images (N, 3, H, W) float in [-1, 1], identity labels (N,) int64)``;
    eval batches ``(images_a, images_b, issame (N,) bool, pair_index (N,) int64)``, one dataloader
    per verification set (:attr:`verification_sets` names them, in order); predict batches
    ``(images, paths)``.

    Args:
        root: dataset root (see the module doc); ``None`` uses the embedded demo faces.
        train_dir: identity-folder training set under ``root`` (used when there is no ``train.rec``).
        val_sets: verification sets to evaluate, by name (``root/<name>.bin`` or ``root/<name>/pairs.txt``);
            the absent ones are skipped with a log line, and none present is an error.
        image_size: input size; the face CLI sets it to the model's.
        batch_size: per-device training batch size.
        val_batch_size: per-device pairs per evaluation batch (each pair is two images, each embedded
            with its flip); default ``batch_size``.
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        flip: random horizontal flip for training.
        predict_root: folder of aligned faces (searched recursively) for ``predict``.
        skip_corrupt: skip unreadable training images (logged and counted) instead of stopping;
            verification pairs are never skipped, as that would change the protocol.
        seed: seed of the training order and augmentation, a function of ``(seed, epoch)``
            (:class:`SeededSampler`); the CLI sets it to ``seed_everything``.
    """

    data_kind = "face_verification"
    demo = (face_demo, FACE_DEMO_VERSION)
    test_split = "val"  # the test stage evaluates the verification sets that validation does

    def __init__(
        self,
        root: Optional[str] = None,
        train_dir: str = "train",
        val_sets: Sequence[str] = VERIFICATION_SETS,
        image_size: int | tuple[int, int] = 112,
        batch_size: int = 128,
        val_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        flip: bool = True,
        predict_root: Optional[str] = None,
        skip_corrupt: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not val_sets:
            raise ValueError("data.val_sets must name at least one verification set")
        self.root = root
        self.train_dir = train_dir
        self.val_sets = list(val_sets)
        self.image_size = image_hw(image_size)
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.flip = flip
        self.predict_root = predict_root
        self.skip_corrupt = skip_corrupt
        self.seed = seed
        self._sets: Optional[dict[str, str]] = None
        self._sets_error: Optional[FileNotFoundError] = None
        self.datasets: dict[str, Dataset] = {}
        self.eval_sets: dict[str, list[VerificationPairs]] = {}
        self._check_loader_settings()

    # ------------------------------------------------------------------ layout
    @property
    def data_root(self) -> Path:
        """The dataset root; the demo faces are generated here on first use when ``root`` is None."""
        root = Path(self.root) if self.root is not None else face_demo()
        if not root.is_dir():
            raise FileNotFoundError(f"face data root {root} does not exist (data.root)")
        return root

    @property
    def uses_recordio(self) -> bool:
        return (self.data_root / "train.rec").exists()

    @property
    def num_classes(self) -> int:
        """Training identities: from ``property`` (RecordIO) or the identity folders; 0 when the
        root has no training set (enough to test or predict with a trained checkpoint)."""
        root = self.data_root
        if self.uses_recordio:
            return read_property(root)[0]
        if (root / self.train_dir).is_dir():
            return len(find_classes(root / self.train_dir))
        return 0

    @property
    def verification_sets(self) -> list[str]:
        """Names of the configured verification sets that are present, in ``val_sets`` order
        (possibly none: ``predict`` needs none, and the other stages say so in ``setup``)."""
        if self._sets is None:
            try:
                self._sets = find_verification_sets(self.data_root, self.val_sets)
            except FileNotFoundError as exc:
                self._sets, self._sets_error = {}, exc
            missing = [n for n in self.val_sets if n not in self._sets]
            if missing and self._sets:
                log.info("verification sets not found under %s, skipped: %s", self.data_root, ", ".join(missing))
        return list(self._sets)

    def describe(self) -> dict[str, Any]:
        """:meth:`SplitDataModule.describe` with the verification ``sets`` the test stage evaluates."""
        return {**super().describe(), "sets": self.verification_sets}

    def prepare_data(self) -> None:
        self.data_root  # generates the demo set once, on one process per node

    # ------------------------------------------------------------------ datasets
    def calibration_set(self) -> Dataset:
        return self._train_set(flip=False)

    def _train_set(self, flip: Optional[bool] = None) -> Dataset:
        root = self.data_root
        transform = face_transform(self.image_size, self.flip if flip is None else flip)
        if self.uses_recordio:
            missing = [f for f in RECORD_FILES if not (root / f).exists()]
            if missing:
                raise FileNotFoundError(f"face data root {root} has train.rec but lacks {', '.join(missing)}")
            dataset = FaceRecordDataset(root, transform, self.skip_corrupt)
            log.info("train: %d faces of %d identities from %s", len(dataset), dataset.num_classes, root / "train.rec")
            return dataset
        folder = root / self.train_dir
        if not folder.is_dir():
            raise FileNotFoundError(
                f"face data root {root} has no training set: expected insightface RecordIO "
                f"({', '.join(RECORD_FILES)}) or identity folders {folder}/<identity>/*.jpg (data.train_dir)"
            )
        samples = list_samples(folder, find_classes(folder))
        log.info("train: %d faces of %d identities from %s", len(samples), self.num_classes, folder)
        return ImageFolder(samples, transform, self.skip_corrupt)

    def _eval_sets(self) -> list[VerificationPairs]:
        if not self.verification_sets:
            raise self._sets_error
        assert self._sets is not None
        transform = face_transform(self.image_size, flip=False)
        sets = []
        for name, path in self._sets.items():
            dataset = load_verification_set(path, transform=transform, image_size=self.image_size)
            log.info("verification set %s: %d pairs from %s", name, len(dataset), path)
            sets.append(dataset)
        return sets

    def setup(self, stage: Optional[str] = None) -> None:
        # Every file is found and checked here, before the first step.
        if stage in ("fit", None):
            self.datasets["train"] = self._train_set()
        if stage in ("fit", "validate", None):
            self.eval_sets["val"] = self._eval_sets()
        if stage in ("test", None):
            self.eval_sets["test"] = self.eval_sets.get("val") or self._eval_sets()
        if stage in ("predict", None):
            if self.predict_root is None:
                raise ValueError("predict needs a folder of aligned faces: --data.predict_root FOLDER")
            transform = face_transform(self.image_size, flip=False)
            self.datasets["predict"] = ImageList(list_images(self.predict_root), transform, self.skip_corrupt)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(dataset, train=False) for dataset in self.eval_sets["val"]]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(dataset, train=False) for dataset in self.eval_sets["test"]]
