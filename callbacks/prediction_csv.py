"""TopKCSVWriter: write a classifier's top-k labels and scores per image to a CSV while predicting.

Columns: ``path, label_1, score_1, ..., label_k, score_k``. Labels are the datamodule's class
names when it has ``classes``, else class indices. Rows are written batch by batch, so memory
stays flat on large folders. With several ranks each writes ``<name>.rank<N>.csv`` and rank 0
merges them into ``<name>.csv`` at the end.
"""
from __future__ import annotations

import csv
import os
import shutil
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

__all__ = ["TopKCSVWriter"]


class TopKCSVWriter(BasePredictionWriter):
    """Args:
        path: output CSV; default ``<log folder>/predictions.csv``.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._file: Any = None
        self._writer: Any = None
        self._classes: Optional[Sequence[str]] = None
        self.rows = 0

    def _target(self, trainer: pl.Trainer) -> str:
        return self.path or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.csv")

    def _part(self, target: str, rank: int, world: int) -> str:
        return target if world == 1 else f"{os.path.splitext(target)[0]}.rank{rank}.csv"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.target = self._target(trainer)  # log_dir is collective: every rank asks
        os.makedirs(os.path.dirname(os.path.abspath(self.target)), exist_ok=True)
        self._classes = getattr(trainer.datamodule, "classes", None) if trainer.datamodule is not None else None
        part = self._part(self.target, trainer.global_rank, trainer.world_size)
        self._file = open(part, "w", newline="")
        self._writer = csv.writer(self._file)
        self._header_k: Optional[int] = None
        self.rows = 0

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if prediction is None:  # every image of the batch was corrupt and skipped
            return
        indices, scores = prediction["indices"], prediction["scores"]
        k = indices.shape[1]
        if self._header_k is None:
            self._header_k = k
            if trainer.global_rank == 0:
                self._writer.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"score_{i}")])
        for path, idx, sc in zip(prediction["paths"], indices.tolist(), scores.tolist()):
            labels = [self._classes[i] if self._classes is not None else str(i) for i in idx]
            self._writer.writerow([path] + [v for pair in zip(labels, (f"{s:.6f}" for s in sc)) for v in pair])
            self.rows += 1

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._file.close()
        if trainer.world_size > 1:
            trainer.strategy.barrier("TopKCSVWriter")
            if trainer.global_rank == 0:
                with open(self.target, "w", newline="") as out:
                    for rank in range(trainer.world_size):
                        part = self._part(self.target, rank, trainer.world_size)
                        with open(part) as f:
                            shutil.copyfileobj(f, out)
                        os.remove(part)
        if trainer.is_global_zero:
            print(f"predictions written to {self.target}")
