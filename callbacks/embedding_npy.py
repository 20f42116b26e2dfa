"""EmbeddingWriter: write the embeddings of a folder of faces to ``.npy`` with the file list.

``predict`` of the face task yields ``{"paths", "embeddings" (N, D)}`` per batch. This writes
``<name>.npy`` (float32 ``(num_images, D)``, row ``i`` for line ``i`` of the list) and
``<name>.txt`` (one path per line). With several ranks each writes ``<name>.rank<N>.*`` and
rank 0 concatenates them; the list stays aligned with the rows whatever the sharding.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

__all__ = ["EmbeddingWriter"]


class EmbeddingWriter(BasePredictionWriter):
    """Args:
        path: output ``.npy``; default ``<log folder>/embeddings.npy`` (the list goes next to it as ``.txt``).
    """

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._chunks: list[np.ndarray] = []
        self._paths: list[str] = []

    def _stem(self, trainer: pl.Trainer) -> str:
        target = self.path or os.path.join(trainer.log_dir or trainer.default_root_dir, "embeddings.npy")
        return os.path.splitext(target)[0]

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stem = self._stem(trainer)  # log_dir is collective: every rank asks
        os.makedirs(os.path.dirname(os.path.abspath(self.stem)), exist_ok=True)
        self._chunks, self._paths = [], []

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if prediction is None:  # every image of the batch was corrupt and skipped
            return
        self._chunks.append(prediction["embeddings"].float().numpy())
        self._paths.extend(prediction["paths"])

    @staticmethod
    def _save(stem: str, embeddings: np.ndarray, paths: list[str]) -> None:
        np.save(f"{stem}.npy", embeddings)
        with open(f"{stem}.txt", "w") as f:
            f.writelines(f"{p}\n" for p in paths)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        embeddings = np.concatenate(self._chunks) if self._chunks else np.zeros((0, 0), np.float32)
        world, rank = trainer.world_size, trainer.global_rank
        if world == 1:
            self._save(self.stem, embeddings, self._paths)
        else:
            self._save(f"{self.stem}.rank{rank}", embeddings, self._paths)
            trainer.strategy.barrier("EmbeddingWriter")
            if rank == 0:
                parts, paths = [], []
                for r in range(world):
                    part = f"{self.stem}.rank{r}"
                    rows = np.load(f"{part}.npy")
                    if rows.size:
                        parts.append(rows)
                    with open(f"{part}.txt") as f:
                        paths += f.read().splitlines()
                    os.remove(f"{part}.npy")
                    os.remove(f"{part}.txt")
                self._save(self.stem, np.concatenate(parts), paths)
        self.count = len(self._paths)
        if trainer.is_global_zero:
            print(f"embeddings written to {self.stem}.npy and the file list to {self.stem}.txt")
