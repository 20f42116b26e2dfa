"""``model.weight_decay_end``: the weight decay annealed with a cosine over the run (MobileOne's
MMPretrain recipe, 1e-4 → 1e-5), set from global_step before every optimizer step, so a resumed
run continues with the uninterrupted run's values. Expectations are the cosine written out here."""
from __future__ import annotations

import math
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tasks.augment import MixupConfig
from tasks.classification import ClassificationTask

START, END = 1e-2, 1e-3  # large enough to matter in a few steps
STEPS = 6  # 2 epochs of 3 batches


def cosine(step: int, total: int) -> float:
    return END + (START - END) * 0.5 * (1 + math.cos(math.pi * step / total))


def task(**kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask("resnet_tiny", num_classes=4, lr=0.05, weight_decay=START,
                              label_smoothing=0.1, **kwargs)


def loader() -> DataLoader:
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 0, 1])
    return DataLoader(TensorDataset(images, labels), batch_size=4, generator=torch.Generator().manual_seed(2))


class Record(pl.Callback):
    """Each step's weight decay per parameter group (as the optimizer used it) and loss."""

    def __init__(self) -> None:
        self.decay, self.losses = {}, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step just taken
        self.decay[step] = [g["weight_decay"] for g in trainer.optimizers[0].param_groups]
        self.losses[step] = float(outputs["loss"])


def fit(model: ClassificationTask, tmp_path, ckpt_path=None) -> Record:
    record = Record()
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, num_sanity_val_steps=0, callbacks=[
            record, ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1,
                                    save_on_train_epoch_end=True)])
    # weights_only, as the CLI loads: the hyperparameters (model.mixup included) are plain values
    trainer.fit(model, loader(), ckpt_path=ckpt_path, weights_only=True)
    return record


def test_factor_is_the_cosine_from_weight_decay_to_weight_decay_end():
    model = task(weight_decay_end=END)
    for step in (0, 25, 50, 75, 100):
        assert START * model.weight_decay_factor(step, 100) == pytest.approx(cosine(step, 100), rel=1e-12)
    assert START * model.weight_decay_factor(0, 100) == pytest.approx(START)
    assert START * model.weight_decay_factor(50, 100) == pytest.approx((START + END) / 2)
    assert START * model.weight_decay_factor(100, 100) == pytest.approx(END)
    assert START * model.weight_decay_factor(150, 100) == pytest.approx(END)  # past the end: held
    assert all(task().weight_decay_factor(s, 100) == 1.0 for s in (0, 50, 100))  # None: constant


def test_each_step_uses_the_annealed_value_and_no_decay_groups_stay_zero(tmp_path):
    record = fit(task(weight_decay_end=END), tmp_path)
    assert sorted(record.decay) == list(range(STEPS))
    for step, (decay, no_decay) in record.decay.items():
        assert decay == pytest.approx(cosine(step, STEPS), rel=1e-12)
        assert no_decay == 0.0
    assert record.decay[STEPS - 1][0] < record.decay[0][0]
    constant = fit(task(), tmp_path / "constant")
    assert all(values == [START, 0.0] for values in constant.decay.values())


def test_resume_continues_with_the_uninterrupted_values(tmp_path):
    mixup = MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0)  # the RNG-driven part resumes too
    whole = fit(task(weight_decay_end=END, mixup=mixup), tmp_path / "whole")
    first = sorted((tmp_path / "whole" / "ckpt").glob("epoch=0*.ckpt"))
    assert len(first) == 1
    resumed = fit(task(weight_decay_end=END, mixup=mixup), tmp_path / "resumed", ckpt_path=str(first[0]))
    assert sorted(resumed.decay) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed.decay[step] == whole.decay[step]
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(weight_decay_end=-1e-5), dict(weight_decay=0.0, weight_decay_end=1e-5)])
def test_bad_values_are_named(kwargs):
    with pytest.raises(ValueError, match=re.escape("model.weight_decay_end must be >= 0")):
        ClassificationTask("resnet_tiny", num_classes=4, **{"weight_decay": START, **kwargs})


def test_a_step_limited_run_warms_up_over_epochs_of_the_train_loader(tmp_path):
    """``max_epochs: -1, max_steps: N`` (the face and Cityscapes trainer files) with a warm-up in
    epochs: an epoch is one pass over the train loader (3 batches), so 1 epoch = 3 steps."""
    model = ClassificationTask("resnet_tiny", num_classes=4, lr=0.1, warmup_epochs=1, warmup_start_factor=0.1)
    lrs = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=-1, max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0, enable_checkpointing=False, callbacks=[LR()])
    trainer.fit(model, loader())
    warm = [0.1 * (0.1 + 0.9 * s / 3) for s in range(3)]
    assert lrs[:3] == pytest.approx(warm) and lrs[3] == pytest.approx(0.1)
