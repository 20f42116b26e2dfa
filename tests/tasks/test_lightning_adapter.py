"""The Lightning internals :mod:`tasks.lightning.adapter` relies on are still there and behave as
it assumes. A failure here after a Lightning upgrade names what changed: adapt the adapter (and
the bound in setup.py) rather than the callers."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.lightning import adapter


class _Tiny(pl.LightningModule):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(width, 1)
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.seen.append((batch_idx, adapter.batches_done(self.trainer)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(6, self.hparams.width)), batch_size=2)


def test_the_fit_loop_still_counts_the_batches_processed_in_the_epoch(tmp_path):
    probe = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False)
    try:
        probe.fit_loop.epoch_loop.batch_progress.current.processed
    except AttributeError as e:
        pytest.fail(f"Lightning {pl.__version__} moved trainer.fit_loop.epoch_loop.batch_progress.current.processed "
                    f"({e}); tasks.lightning.adapter.batches_done reads the mid-epoch data position from it")
    model = _Tiny()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model)
    assert model.seen == [(0, 1), (1, 2), (2, 3)] * 2, (
        f"Lightning {pl.__version__}: batch_progress.current.processed no longer counts the batches of the "
        f"current epoch done at on_train_batch_end (got (batch_idx, processed) = {model.seen})")


class _Stop(Exception):
    pass


class _PlainCLI(LightningCLI):
    """Lightning's own behaviour, stopped before anything is built."""

    def before_instantiate_classes(self) -> None:
        raise _Stop(self.config)


class _HoldingCLI(_PlainCLI):
    """What TaskCLI does with the adapter."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        adapter.hold_ckpt_path(self)

    def before_instantiate_classes(self) -> None:
        adapter.release_ckpt_path(self)
        super().before_instantiate_classes()


def _parsed(cli: type, ckpt) -> tuple[int, str]:
    with pytest.raises(_Stop) as stopped:
        cli(_Tiny, args=["validate", "--model.width", "4", "--ckpt_path", str(ckpt)], save_config_callback=None)
    config = stopped.value.args[0].validate
    return config.model.width, config.ckpt_path


def test_lightningcli_still_takes_model_arguments_from_a_checkpoint_between_parse_and_instantiate(tmp_path):
    ckpt = tmp_path / "other.ckpt"
    torch.save({"hyper_parameters": {"width": 8}, "state_dict": {}}, ckpt)
    assert hasattr(LightningCLI, "_parse_ckpt_path"), (
        f"Lightning {pl.__version__} no longer has LightningCLI._parse_ckpt_path: check whether it still replaces "
        "the model arguments by the --ckpt_path file's hyperparameters, and where (tasks.lightning.adapter.hold_ckpt_path)")
    width, _ = _parsed(_PlainCLI, ckpt)
    assert width == 8, (
        f"Lightning {pl.__version__}'s LightningCLI no longer takes the model arguments from the checkpoint "
        "between parse_arguments and before_instantiate_classes; tasks.lightning.adapter.hold_ckpt_path "
        "(and its use in TaskCLI) may be unnecessary or in the wrong place")
    assert _parsed(_HoldingCLI, ckpt) == (4, str(ckpt)), (
        "holding ckpt_path through parse_arguments no longer keeps the config's model arguments")


class _SaveAt(pl.Callback):
    """Saves the full training state at one global step (ModelCheckpoint's place in the hooks)."""

    def __init__(self, path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class _Closing(_Tiny):
    def on_train_start(self) -> None:
        adapter.close_restored_epoch(self.trainer)


def _resume_twice(tmp_path, model_class: type) -> tuple[int, int]:
    """Three batches an epoch: fit one epoch (state at its last batch), resume for a second epoch
    (state after its first batch), resume from that: ``(global_step, epochs trained)`` at the end."""
    def fit(ckpt, save_at):
        model = model_class()
        epochs = []
        model.on_train_epoch_end = lambda: epochs.append(model.trainer.current_epoch)
        trainer = pl.Trainer(max_epochs=2 if ckpt else 1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[_SaveAt(tmp_path / f"at{save_at}.ckpt", save_at)] if save_at else [])
        trainer.fit(model, ckpt_path=ckpt)
        return trainer.global_step, epochs

    fit(None, 3)
    fit(tmp_path / "at3.ckpt", 4)
    return fit(tmp_path / "at4.ckpt", None)


def test_a_state_saved_after_resuming_at_an_epoch_end_resumes_without_repeating_the_epoch(tmp_path):
    step, epochs = _resume_twice(tmp_path / "plain", _Tiny)
    assert (step, epochs) == (7, [1]), (
        f"Lightning {pl.__version__} changed how it resumes a run that was itself resumed at an epoch end "
        f"(got global_step {step}, epochs {epochs}; 2.6 trains the second epoch again: 7, [1]); if it now ends "
        "at step 6, the defect is fixed: remove tasks.lightning.adapter.close_restored_epoch")
    assert _resume_twice(tmp_path / "closing", _Closing) == (6, [1])


def test_a_step_limited_run_knows_its_epoch_length_in_configure_optimizers():
    """``max_epochs: -1, max_steps: N`` (the face and Cityscapes recipes): Lightning's
    ``estimated_stepping_batches`` returns ``max_steps`` without loading the train loader; the
    adapter loads it so that a warm-up in epochs has a length (3 batches per epoch here)."""
    seen = {}

    class _Counted(_Tiny):
        def configure_optimizers(self):
            assert self.trainer.estimated_stepping_batches == 5
            seen["before"] = self.trainer.num_training_batches
            seen["per_epoch"] = adapter.train_batches_per_epoch(self.trainer)
            return super().configure_optimizers()

    trainer = pl.Trainer(max_epochs=-1, max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Counted())
    assert seen["before"] == float("inf"), "Lightning now loads the train loader for a step-limited run: drop the adapter"
    assert seen["per_epoch"] == 3 and trainer.global_step == 5
