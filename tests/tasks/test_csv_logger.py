"""The resumable CSV log: the pending row a step checkpoint keeps is the row Lightning logs after
saving it, and the table keeps, drops and writes back rows as a resumed run needs."""
from __future__ import annotations

import csv
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.base import ReparamTask
from tasks.lightning.csv_logger import CheckpointedCSVLogger, MetricsTable


class _Calls(Logger):
    """Every row Lightning hands to the loggers, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "calls"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.calls.append({"step": step, "metrics": dict(metrics)})


class _Probe(ReparamTask):
    """A ReparamTask with a linear model, logging every kind of value Lightning converts."""

    def __init__(self) -> None:
        super().__init__("repmlp_res_tiny", lr=0.01, warmup_epochs=0)
        self.layer = nn.Linear(3, 1)
        self.events: list[tuple[str, Any, int]] = []  # (what, pending row, rows logged so far)

    def calls(self) -> list[dict[str, Any]]:
        return self.trainer.loggers[0].calls

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        self.log("train/lr", 0.1)  # a Python float: Lightning logs it as a float32 tensor
        self.log("train/both", loss * 2, on_epoch=True)  # logged as train/both_step
        self.log("train/count", torch.tensor(batch_idx))  # an integer tensor, made floating
        self.log("train/synced", loss, sync_dist=True)
        self.log("train/hidden", 1.0, logger=False)
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.events.append(("batch", None, len(self.calls())))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.events.append(("save", checkpoint.get("pending_log_row"), len(self.calls())))

    def train_dataloader(self):
        data = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data), batch_size=2)


@pytest.mark.parametrize("log_every, accumulate", [(1, 1), (2, 2), (3, 1)])
def test_the_pending_row_of_a_step_checkpoint_is_the_row_lightning_logs_after_it(tmp_path, log_every, accumulate):
    torch.manual_seed(0)
    task = _Probe()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=_Calls(), limit_val_batches=0, log_every_n_steps=log_every,
        accumulate_grad_batches=accumulate, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=1)],
    )
    trainer.fit(task)
    calls, events = task.calls(), task.events
    saves = [i for i, e in enumerate(events) if e[0] == "save"]
    assert len(saves) >= 5 and any(events[i][1] is not None for i in saves)
    for i in saves:
        _, pending, logged = events[i]
        after = next((e[2] for e in events[i + 1:] if e[0] == "batch"), len(calls))
        # what Lightning logged between this checkpoint and the next batch: the batch's row, or nothing
        # (besides the epoch's row of on_epoch values, which PendingRow does not cover)
        window = [c for c in calls[logged:after] if "train/both_epoch" not in c["metrics"]]
        assert len(window) <= 1
        assert pending == (window[0] if window else None), (log_every, accumulate, i)
    logged_keys = {k for c in calls for k in c["metrics"]}
    assert logged_keys == {"train/loss", "train/lr", "train/both_step", "train/both_epoch", "train/count",
                           "train/synced", "epoch"}


def _table(path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_table_writes_each_row_at_once_and_a_resume_keeps_what_came_before_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    table = MetricsTable(path)
    table.add({"train/loss": 0.5, "epoch": 0}, 0)
    assert _table(path) == [{"epoch": "0", "step": "0", "train/loss": "0.5"}]
    table.add({"train/loss": 0.25, "epoch": 0}, 1)
    table.add({"val/acc": 0.75, "epoch": 0}, 1)  # a new column: the file is rewritten with it
    table.add({"train/loss": 0.125, "epoch": 0}, 2)
    assert [r["val/acc"] for r in _table(path)] == ["", "", "0.75", ""]

    resumed = MetricsTable(path, resume_step=2)  # the row of step 2 is logged again by the resumed run
    assert [(r["step"], r["train/loss"]) for r in _table(path)] == [("0", "0.5"), ("1", "0.25"), ("1", "")]
    resumed.add({"val/acc": 0.75, "epoch": 0}, 1)  # a pending row the file holds: not written twice
    assert len(_table(path)) == 3
    resumed.add({"train/loss": 0.125, "epoch": 0}, 2)
    assert [r["train/loss"] for r in _table(path)] == ["0.5", "0.25", "", "0.125"]


def test_a_pending_row_the_killed_run_did_not_write_is_written_back(tmp_path):
    path = tmp_path / "metrics.csv"
    table = MetricsTable(path)
    table.add({"train/loss": 0.5, "epoch": 0}, 0)
    # killed after the checkpoint of global_step 2, before the row of step 1 was written
    resumed = MetricsTable(path, resume_step=2)
    resumed.add({"train/loss": 0.25, "epoch": 0}, 1)
    resumed.add({"train/loss": 0.125, "epoch": 0}, 2)
    assert [(r["step"], r["train/loss"]) for r in _table(path)] == [("0", "0.5"), ("1", "0.25"), ("2", "0.125")]


def test_a_new_run_starts_a_new_file_and_the_logger_prefixes_and_records_hparams(tmp_path):
    (tmp_path / "run" / "version_0").mkdir(parents=True)
    (tmp_path / "run" / "version_0" / "metrics.csv").write_text("step,old\n0,1\n")
    logger = CheckpointedCSVLogger(tmp_path, name="run", version=0, prefix="p")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"loss": 1.5}, step=3)
    assert _table(tmp_path / "run" / "version_0" / "metrics.csv") == [{"p-loss": "1.5", "step": "3"}]
    assert "lr: 0.1" in (tmp_path / "run" / "version_0" / "hparams.yaml").read_text()
    assert logger.log_dir == str(tmp_path / "run" / "version_0")
