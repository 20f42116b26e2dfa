"""The four places where the project needs Lightning behaviour that has no public API.

Everything else in the project uses Lightning's public API. The four here rely on Lightning
internals, checked by ``tests/tasks/test_lightning_adapter.py`` (which fails with a message naming
what changed when a Lightning upgrade breaks an assumption; ``setup.py`` bounds the version):

- :func:`batches_done`: the batches of the current training epoch the trainer has processed, read
  from ``trainer.fit_loop.epoch_loop.batch_progress.current.processed``. A datamodule checkpoints
  this position so a run stopped mid-epoch resumes at the next batch
  (:class:`datamodules.split_loaders.SplitDataModule`); Lightning exposes no public counter of it
  (``trainer.global_step`` counts optimizer steps, and a resumed epoch's ``batch_idx`` restarts).
- :func:`hold_ckpt_path` / :func:`release_ckpt_path`: ``LightningCLI.__init__`` calls the private
  ``LightningCLI._parse_ckpt_path`` right after :meth:`~pytorch_lightning.cli.LightningCLI.parse_arguments`;
  for a ``--ckpt_path`` file with ``hyper_parameters`` it re-parses the model arguments from the
  checkpoint, replacing the config's. Here the config decides what is built, and a checkpoint that
  does not fit it is an error saying why (:meth:`tasks.base.ReparamTask.on_load_checkpoint`), so
  :class:`tasks.lightning.cli.TaskCLI` takes ``ckpt_path`` out of the parsed config in
  ``parse_arguments`` and puts it back in ``before_instantiate_classes`` (both public hooks), before
  Lightning uses it for the subcommand.
- :func:`close_restored_epoch`: works around a fit-loop defect (Lightning 2.6). Resumed from a
  checkpoint saved at the last batch of an epoch, ``FitLoop.reset`` closes that epoch but leaves the
  loop "restarted mid-epoch", so the next epoch is never counted as started (and its
  ``on_train_epoch_start`` hooks are skipped); a checkpoint saved during that epoch records it as
  not begun, and resuming from it trains the epoch again. Called from the task's ``on_train_start``.
- :func:`train_batches_per_epoch`: the batches of one training epoch, in ``configure_optimizers``.
  For a step-limited run (``max_epochs: -1``, ``max_steps: N``: the face and Cityscapes recipes)
  ``trainer.estimated_stepping_batches`` returns ``max_steps`` without loading the train loader, so
  ``trainer.num_training_batches`` is still infinite there, and a warm-up given in epochs needs
  the epoch's length: the loader is set up the way ``estimated_stepping_batches`` itself does it
  (``trainer.fit_loop.setup_data()``).
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

__all__ = ["batches_done", "close_restored_epoch", "hold_ckpt_path", "release_ckpt_path", "train_batches_per_epoch"]

_HELD = "_adapter_held_ckpt_path"


def batches_done(trainer: pl.Trainer) -> int:
    """Batches of the current training epoch processed so far (including the batches before a
    mid-epoch resume)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def hold_ckpt_path(cli: Any) -> None:
    """Take ``ckpt_path`` out of ``cli.config`` (of the subcommand) so that LightningCLI does not
    replace the model arguments by the checkpoint's hyperparameters; :func:`release_ckpt_path`
    restores it."""
    sub = cli.config.get("subcommand")
    if sub and cli.config[sub].get("ckpt_path") is not None:
        setattr(cli, _HELD, cli.config[sub].ckpt_path)
        cli.config[sub].ckpt_path = None


def release_ckpt_path(cli: Any) -> None:
    """Put back the ``ckpt_path`` :func:`hold_ckpt_path` took out."""
    if hasattr(cli, _HELD):
        cli.config[cli.config.subcommand].ckpt_path = getattr(cli, _HELD)
        delattr(cli, _HELD)


def close_restored_epoch(trainer: pl.Trainer) -> None:
    """At ``on_train_start``: if the restored epoch is already closed (its last batch was done),
    leave the "restarted mid-epoch" stage so the next epoch starts as a new one (see the module doc)."""
    loop = trainer.fit_loop
    progress = loop.epoch_progress.current
    if loop.restarted_mid_epoch and progress.started == progress.processed:
        loop.reset_restart_stage()


def train_batches_per_epoch(trainer: pl.Trainer) -> float:
    """Training batches in one epoch (``trainer.num_training_batches``), loading the train loader
    first when the trainer has not (see the module doc); infinite for an iterable dataset."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    return trainer.num_training_batches
