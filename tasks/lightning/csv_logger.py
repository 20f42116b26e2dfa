"""A CSV logger whose ``metrics.csv`` survives a kill at any moment, so a resumed run keeps its history.

Two things would otherwise make a killed and resumed run's ``metrics.csv`` differ from an
uninterrupted run's:

- Lightning's CSVLogger keeps its rows in memory (writing every 100 steps) and deletes the
  ``metrics.csv`` it finds in its folder. :class:`CheckpointedCSVLogger` writes each row when it
  is logged, and a resumed run (``resume_step``: the ``global_step`` of the checkpoint it resumes
  from) keeps the rows before the checkpoint (``step < resume_step``) and drops the later ones,
  which the resumed run logs again.
- Lightning saves a step checkpoint (ModelCheckpoint's ``on_train_batch_end``) *before* it hands
  that batch's row (logged at step ``global_step - 1``) to the loggers; a kill in between loses the
  row, and the resumed run, which starts at ``global_step``, never logs it. :class:`PendingRow`
  keeps that row while it is pending; :class:`tasks.base.ReparamTask` saves it in the checkpoint
  and, on resume, gives it to this logger, which writes it unless the file already has it.

The configs use this logger; :class:`tasks.lightning.cli.TaskCLI` also puts it in place of a
configured CSVLogger when it resumes a run.
"""
from __future__ import annotations

import csv
import inspect
import os
from argparse import Namespace
from pathlib import Path
from typing import Any, Optional, Union

import pytorch_lightning as pl
import torch
from fsspec.utils import get_protocol
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from backbones.weights.io import atomic_write

from .run_folder import claim_version

__all__ = ["CheckpointedCSVLogger", "MetricsTable", "PendingRow"]

METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"


def _text(value: Any) -> str:
    """A metric value as the CSV holds it."""
    return str(value.item() if isinstance(value, torch.Tensor) else value)


class MetricsTable:
    """``metrics.csv``: one row per logged dict, columns sorted by name, each row on disk as soon as
    it is added (a new column rewrites the file atomically).

    ``resume_step``: None starts a new file; otherwise the rows of the existing file with
    ``step < resume_step`` are kept, and a row added with such a step (the interrupted run's, given
    again) is written only if the file does not hold it yet.
    """

    def __init__(self, path: Path, resume_step: Optional[int] = None) -> None:
        self.path = path
        self.resume_step = resume_step
        self.keys: list[str] = []
        self.rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.keys = list(reader.fieldnames or [])
                self.rows = [{k: v for k, v in row.items() if v != ""} for row in reader
                             if row.get("step") and int(float(row["step"])) < resume_step]
            self._rewrite()
        elif path.is_file():
            path.unlink()  # a new run in a folder with an old file: start over, as Lightning's CSVLogger does

    def add(self, metrics: dict[str, Any], step: int) -> None:
        row = {k: _text(v) for k, v in metrics.items()}
        row["step"] = str(step)
        if self.resume_step is not None and step < self.resume_step and row in self.rows:
            return  # the interrupted run wrote it
        self.rows.append(row)
        if set(row) - set(self.keys):
            self.keys = sorted(set(self.keys) | set(row))
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.keys).writerow(row)

    def _rewrite(self) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=self.keys)
                out.writeheader()
                out.writerows(self.rows)

        atomic_write(str(self.path), write)


class CheckpointedCSVLogger(CSVLogger):
    """Logs to ``save_dir/name/version_N/metrics.csv`` (and ``hparams.yaml``) like Lightning's
    :class:`~pytorch_lightning.loggers.CSVLogger`, each row written when it is logged; see the
    module doc for ``resume_step``.

    Args:
        save_dir, name, version, prefix: as for CSVLogger.
        resume_step: the ``global_step`` of the checkpoint this run resumes from (None: a new run).
    """

    def __init__(
        self,
        save_dir: Union[str, Path],
        name: Optional[str] = "lightning_logs",
        version: Optional[Union[int, str]] = None,
        prefix: str = "",
        resume_step: Optional[int] = None,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix)
        self._claimed = version
        self.resume_step = resume_step
        self.metrics_prefix = prefix
        self._table: Optional[MetricsTable] = None
        self._hparams: dict[str, Any] = {}

    @property
    def version(self) -> Union[int, str]:
        """The given version, else the one this run claims by creating its folder
        (:func:`~tasks.lightning.run_folder.claim_version`: two fresh runs never share one). Other
        ranks than 0 only compute it, as Lightning does; rank 0's folder is the run's."""
        if self._claimed is None:
            local = get_protocol(str(self.root_dir)) == "file"
            self._claimed = claim_version(Path(self.root_dir)) if local and rank_zero_only.rank == 0 else super().version
        return self._claimed

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricsTable:
        if self._table is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._table = MetricsTable(Path(self.log_dir) / METRICS_FILE, self.resume_step)
        return self._table

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self.metrics_prefix:
            metrics = {f"{self.metrics_prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        table = self.experiment
        table.add(metrics, len(table.rows) if step is None else step)

    @rank_zero_only
    def log_hyperparams(self, params: Optional[Union[dict[str, Any], Namespace]] = None, *args: Any, **kwargs: Any) -> None:
        self._hparams.update(vars(params) if isinstance(params, Namespace) else dict(params or {}))
        os.makedirs(self.log_dir, exist_ok=True)
        save_hparams_to_yaml(os.path.join(self.log_dir, HPARAMS_FILE), self._hparams)

    @rank_zero_only
    def save(self) -> None:
        pass  # every row is on disk once logged

    @rank_zero_only
    def finalize(self, status: str) -> None:
        pass


_LOG_SIGNATURE = inspect.signature(pl.LightningModule.log)


class PendingRow:
    """The row Lightning will log for the training batch in progress, collected from the task's
    ``self.log`` calls between its ``on_train_batch_start`` and ``on_train_batch_end`` (the window
    in which ModelCheckpoint saves a step checkpoint, before Lightning logs the row).

    It follows Lightning's rules for that row: values logged ``on_step`` to the logger, named
    ``NAME_step`` when also ``on_epoch``, reduced over processes with ``sync_dist``; the row is
    logged at step ``global_step - 1`` with the ``epoch``, only for a batch that stepped the
    optimizer, every ``log_every_n_steps`` steps (or when the trainer stops).
    Not covered: the epoch's row of values logged in training with ``on_epoch=True`` (Lightning
    logs it after the epoch-end checkpoint too) and values logged in the task's own
    ``on_train_batch_end`` (after the checkpoint callbacks ran); the tasks log their training
    values per step, in ``training_step``.
    ``tests/tasks/test_csv_logger.py`` checks these rules against the rows Lightning logs.
    """

    def __init__(self) -> None:
        self._metrics: Optional[dict[str, float]] = None
        self._start_step = 0

    def start(self, trainer: pl.Trainer) -> None:
        self._metrics = {}
        self._start_step = trainer.global_step

    def end(self) -> None:
        self._metrics = None  # Lightning logs the row next, before any later checkpoint

    def record(self, module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Note one ``module.log(*args, **kwargs)`` call."""
        if self._metrics is None:
            return
        call = _LOG_SIGNATURE.bind(module, *args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        on_step = True if a["on_step"] is None else a["on_step"]  # Lightning's defaults in batch hooks
        on_epoch = False if a["on_epoch"] is None else a["on_epoch"]
        if not on_step or a["logger"] is False:
            return
        value = a["value"]
        value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.get_default_dtype())
        if value.dtype not in (torch.float32, torch.float64):  # Lightning's conversion of what it logs
            value = value.to(torch.get_default_dtype())
        if a["sync_dist"]:
            value = module.trainer.strategy.reduce(value.to(module.device), group=a["sync_dist_group"],
                                                   reduce_op=a["reduce_fx"])
        name = f"{a['name']}_step" if on_epoch else a["name"]
        self._metrics[name] = value.item()

    def pending(self, trainer: pl.Trainer, automatic_optimization: bool = True) -> Optional[dict[str, Any]]:
        """``{"step", "metrics"}`` of the row Lightning has yet to log for this batch, or None."""
        if not self._metrics:
            return None
        if automatic_optimization and trainer.global_step == self._start_step:
            return None  # an accumulating batch: Lightning logs no row
        n = trainer.log_every_n_steps
        if not trainer.fast_dev_run and (n == 0 or (trainer.global_step % n != 0 and not trainer.should_stop)):
            return None
        metrics: dict[str, Any] = dict(self._metrics)
        if "step" in metrics:
            step = int(metrics.pop("step"))
        else:
            metrics.setdefault("epoch", trainer.current_epoch)
            step = trainer.global_step - 1
        return {"step": step, "metrics": metrics}
