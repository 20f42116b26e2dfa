"""SegmentationPNGWriter: per predicted image, the trainId label PNG, a colour PNG and an overlay.

Files in ``dirpath`` (default ``<log folder>/predictions``), named after the input image (a
Cityscapes ``*_leftImg8bit`` suffix is dropped) at its place under the inputs' common folder, so
``seqA/frame_0001.png`` and ``seqB/frame_0001.png`` give ``seqA/frame_0001_pred_*.png`` and
``seqB/...``; two inputs that would give the same name (``a.png`` beside ``a.jpg``) are an error
before anything is written:

- ``<name>_pred_labelTrainIds.png``: single-channel trainIds (0..C-1);
- ``<name>_pred_color.png``: the palette colours (Cityscapes palette for Cityscapes data);
- ``<name>_pred_overlay.png``: the colours blended over the image (``alpha``).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import cv2
import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from datamodules.image_folder import read_image

__all__ = ["SegmentationPNGWriter"]


def _stem(path: str) -> str:
    name = os.path.splitext(os.path.basename(path))[0]
    return name[: -len("_leftImg8bit")] if name.endswith("_leftImg8bit") else name


def output_names(paths: list[str]) -> dict[str, str]:
    """Each input path → its output name: the path under the inputs' common folder, without its
    extension (or Cityscapes suffix). Raises if two inputs would share a name."""
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for path, full in zip(paths, absolute):
        name = os.path.join(os.path.relpath(os.path.dirname(full), root), _stem(full))
        name = os.path.normpath(name)
        if name in owner:
            raise ValueError(f"predict: {owner[name]} and {path} would both be written as {name}_pred_*.png; "
                             "rename one of them or predict them separately")
        owner[name], names[path] = path, name
    return names


def _palette(num: int) -> np.ndarray:
    """A fixed, well-spread palette for datasets that bring none."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (num, 3), dtype=np.uint8)


class SegmentationPNGWriter(BasePredictionWriter):
    """Args:
        dirpath: output folder; default ``<log folder>/predictions``.
        alpha: weight of the colours in the overlay.
    """

    def __init__(self, dirpath: Optional[str] = None, alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        if not 0 <= alpha <= 1:
            raise ValueError(f"predictions.alpha must be in [0, 1], got {alpha}")
        self.dirpath = dirpath
        self.alpha = alpha
        self.written: set[str] = set()  # paths written in this predict run

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions")
        os.makedirs(self.folder, exist_ok=True)
        palette = getattr(trainer.datamodule, "palette", None) if trainer.datamodule is not None else None
        self.palette = np.asarray(palette, dtype=np.uint8) if palette is not None else _palette(256)
        self.written = set()
        # every rank names from the whole input list, so the names agree; a dataset without a
        # path list is named as its batches arrive
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        self.names = output_names([p for loader in loaders for p in getattr(loader.dataset, "paths", [])])

    def _write(self, name: str, image: np.ndarray) -> None:
        path = os.path.join(self.folder, name)
        if path in self.written:
            raise ValueError(f"predict: {path} was already written in this run; two inputs share its name")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not cv2.imwrite(path, image):
            raise OSError(f"cannot write {path}")
        self.written.add(path)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        for path, labels in zip(prediction["paths"], prediction["labels"].numpy()):
            stem = self.names.get(path) or _stem(path)
            color = self.palette[np.minimum(labels, len(self.palette) - 1)]  # RGB
            image = read_image(path)
            if image.shape[:2] != labels.shape:
                image = cv2.resize(image, labels.shape[::-1], interpolation=cv2.INTER_LINEAR)
            overlay = (self.alpha * color + (1 - self.alpha) * image).round().astype(np.uint8)
            self._write(f"{stem}_pred_labelTrainIds.png", labels.astype(np.uint8))
            self._write(f"{stem}_pred_color.png", cv2.cvtColor(color, cv2.COLOR_RGB2BGR))
            self._write(f"{stem}_pred_overlay.png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"predictions written to {self.folder}")
