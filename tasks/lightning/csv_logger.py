"""A CSVLogger whose ``metrics.csv`` stays in step with the checkpoints, so a resumed run keeps its history.

Lightning's CSVLogger writes its rows to disk every 100 steps, so a killed run loses the rows
since, and it deletes the ``metrics.csv`` it finds in its folder, so a run resumed into its own
folder (``fit --ckpt_path last``) loses every row logged before the interruption. This one writes
its rows whenever a checkpoint is saved, and when resuming it keeps the rows logged before the
checkpoint it resumes from (``step < resume_step``, the checkpoint's ``global_step``) and drops the
later ones, which the resumed run logs again: the file reads as if the run had never stopped.
The configs use it; :class:`tasks.lightning.cli.TaskCLI` also puts it in place of a configured CSVLogger
when it resumes a run.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

__all__ = ["CheckpointedCSVLogger"]


class CheckpointedCSVLogger(CSVLogger):
    """:class:`~pytorch_lightning.loggers.CSVLogger`, flushed at every checkpoint, plus ``resume_step``:
    the ``global_step`` of the checkpoint a run resumes from (None: a fresh run)."""

    def __init__(self, *args: Any, resume_step: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None or self.resume_step is None:
            return super().experiment
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        header: list[str] = []
        if path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if row.get("step") and float(row["step"]) < self.resume_step]
        writer = super().experiment  # deletes the old metrics.csv
        if header:
            with path.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(kept)
            writer.metrics_keys = header  # later saves append, and rewrite the header only for new keys
        return writer

    def after_save_checkpoint(self, checkpoint_callback: Checkpoint) -> None:
        self.save()  # the rows up to this checkpoint are on disk before a crash can lose them
