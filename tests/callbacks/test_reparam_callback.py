"""ReparamCallback and the task's deploy handling, with a real Trainer on a tiny demo set."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import randomize_bn
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from backbones import ConvBN, create
from backbones.weights.io import load_state_dict_file
from callbacks.reparam import ReparamCallback, ReparamCheckError
from datamodules.demo import classification_demo
from datamodules.imagenet import ImageNetDataModule
from tasks.base import RESULTS_FILE
from tasks.classification import ClassificationTask

ARCH = "repmlp_res_tiny"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return classification_demo(tmp_path_factory.mktemp("demo"), train_per_class=8, val_per_class=4, image_size=72)


def _dm(root: Path) -> ImageNetDataModule:
    return ImageNetDataModule(root=str(root), image_size=64, batch_size=8, num_workers=0, pin_memory=False)


def _task(backbone: str = ARCH, num_classes: int = 10, **kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(backbone, num_classes=num_classes, lr=0.05, warmup_epochs=0.5, **kwargs)


def _trainer(folder: Path, callbacks=(), **kwargs) -> pl.Trainer:
    kwargs = {"max_epochs": 2, "limit_train_batches": 3, **kwargs}
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=CSVLogger(str(folder), name="run"),
        callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )


def _metrics(trainer: pl.Trainer, task, dm, **kwargs) -> dict[str, float]:
    (out,) = trainer.test(task, datamodule=dm, verbose=False, **kwargs)
    return out


@pytest.fixture(scope="module")
def fitted(demo, tmp_path_factory):
    """One fit with ModelCheckpoint + ReparamCallback; returns (folder, trainer, task, callback, dm)."""
    folder = tmp_path_factory.mktemp("fit")
    dm = _dm(demo)
    task = _task()
    callback = ReparamCallback()
    ckpt = ModelCheckpoint(monitor="val/top1", mode="max", save_last=True)
    trainer = _trainer(folder, [ckpt, callback])
    trainer.fit(task, datamodule=dm)
    return folder, trainer, task, callback, dm, ckpt


def test_fit_leaves_a_checked_deploy_model_and_files(fitted):
    folder, trainer, task, callback, dm, ckpt = fitted
    assert task.deploy and task.backbone.deploy
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in task.modules())
    info = callback.info
    assert info["relative_error"] <= 1e-4 and info["params_deploy"] < info["params_train"]
    assert info["source_checkpoint"] == ckpt.best_model_path
    for key in ("ckpt", "safetensors", "json"):
        assert Path(callback.paths[key]).is_file()
    assert Path(callback.paths["ckpt"]).parent == Path(trainer.log_dir)
    meta = json.loads(Path(callback.paths["json"]).read_text())
    assert meta["backbone"] == {"name": ARCH, "kwargs": {"num_classes": 10}, "deploy": True}
    assert meta["relative_error"] == info["relative_error"]


FAMILY = [("repvgg_a0_tiny", {}), ("qarepvgg_a0_tiny", {}), ("mobileone_s0_tiny", {}), ("replknet_31b_tiny", {}),
          ("resnet18_tiny", {"conv_type": "acb"}), ("resnet18_tiny", {"conv_type": "dbb"}),
          ("resnet18_tiny", {"conv_type": "orepa"})]


@pytest.mark.parametrize("name,kwargs", FAMILY, ids=[f"{n}-{k.get('conv_type', '')}" for n, k in FAMILY])
def test_callback_converts_every_family_backbone(name, kwargs, demo, tmp_path):
    """A short fit of each re-parameterization family backbone: the callback converts, checks and saves it."""
    task = _task(name, backbone_kwargs=kwargs)
    callback = ReparamCallback()
    trainer = _trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, datamodule=_dm(demo))
    assert task.deploy and callback.info["relative_error"] <= 1e-4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in task.modules())
    state_dict, meta = load_state_dict_file(callback.paths["safetensors"])
    assert meta["arch"] == name and meta["model_kwargs"] == {**kwargs, "num_classes": 10}
    create(name, deploy=True, **meta["model_kwargs"]).load_state_dict(state_dict, strict=True)


def test_deploy_safetensors_rebuilds_the_backbone(fitted):
    _, _, task, callback, _, _ = fitted
    state_dict, meta = load_state_dict_file(callback.paths["safetensors"])
    assert meta["arch"] == ARCH and meta["deploy"] is True
    model = create(meta["arch"], deploy=True, **meta["model_kwargs"])
    model.load_state_dict(state_dict)
    x = torch.randn(3, 3, 64, 64)
    task.eval()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), task(x), rtol=0, atol=1e-6)


def test_test_after_fit_uses_deploy_weights_and_equals_the_train_time_model(fitted, tmp_path):
    folder, trainer, task, _, dm, ckpt = fitted
    deploy_metrics = _metrics(trainer, task, dm)
    results = json.loads((Path(trainer.log_dir) / RESULTS_FILE).read_text())
    assert results["deploy"] is True and results["reparam"]["relative_error"] <= 1e-4
    assert results["metrics"]["test/top1"] == pytest.approx(deploy_metrics["test/top1"])
    assert results["params"] == task.reparam_info["params_deploy"] and results["macs"] > 0

    # the train-time best checkpoint, tested as is, gives the same top-1 and top-5
    train_task = _task()
    train_metrics = _metrics(_trainer(tmp_path), train_task, dm, ckpt_path=ckpt.best_model_path)
    assert not train_task.deploy
    assert train_metrics["test/top1"] == deploy_metrics["test/top1"]
    assert train_metrics["test/top5"] == deploy_metrics["test/top5"]
    assert train_metrics["test/loss"] == pytest.approx(deploy_metrics["test/loss"], rel=1e-4)


def test_deploy_checkpoint_round_trip_through_test_stage(fitted, tmp_path):
    _, _, task, callback, dm, _ = fitted
    fresh = _task()  # train-time structure, as the config builds it
    trainer = _trainer(tmp_path)
    metrics = _metrics(trainer, fresh, dm, ckpt_path=callback.paths["ckpt"])
    assert fresh.deploy  # rebuilt from the checkpoint in on_load_checkpoint
    loaded, converted = fresh.state_dict(), task.state_dict()
    assert loaded.keys() == converted.keys()
    for k, v in loaded.items():
        assert torch.equal(v, converted[k]), k
    results = json.loads((Path(trainer.log_dir) / RESULTS_FILE).read_text())
    assert results["deploy"] is True and results["checkpoint"] == callback.paths["ckpt"]
    assert results["reparam"]["relative_error"] == callback.info["relative_error"]
    assert metrics["test/top1"] == results["metrics"]["test/top1"]


def test_train_checkpoint_into_a_deploy_built_task_is_tested_as_train_time(fitted, tmp_path):
    _, _, _, _, dm, ckpt = fitted
    task = _task(deploy=True)
    trainer = _trainer(tmp_path)
    _metrics(trainer, task, dm, ckpt_path=ckpt.best_model_path)
    assert not task.deploy
    assert json.loads((Path(trainer.log_dir) / RESULTS_FILE).read_text())["deploy"] is False


def test_deploy_checkpoint_of_another_backbone_is_refused(fitted, tmp_path):
    _, _, _, callback, dm, _ = fitted
    with pytest.raises(ValueError, match=r"holds backbone 'repmlp_res_tiny', but this run builds 'resnet_tiny'"):
        _metrics(_trainer(tmp_path), _task("resnet_tiny"), dm, ckpt_path=callback.paths["ckpt"])


def test_class_count_mismatch_is_explained(fitted, tmp_path):
    _, _, _, callback, dm, _ = fitted
    with pytest.raises(ValueError, match=r"class-count mismatch: .* has 10 classes, this run has 7"):
        _task(num_classes=7).load_weights(callback.paths["ckpt"])


def test_fitting_from_a_deploy_checkpoint_is_refused(fitted, tmp_path):
    _, _, _, callback, dm, _ = fitted
    trainer = _trainer(tmp_path, max_epochs=3)
    with pytest.raises(ValueError, match="cannot be trained or resumed"):
        trainer.fit(_task(), datamodule=dm, ckpt_path=callback.paths["ckpt"])


def test_tampered_conversion_is_an_error_and_writes_nothing(demo, tmp_path, monkeypatch):
    original = ConvBN.get_equivalent_kernel_bias

    def tampered(self):
        kernel, bias = original(self)
        return kernel * 1.05, bias

    monkeypatch.setattr(ConvBN, "get_equivalent_kernel_bias", tampered)
    callback = ReparamCallback(load_best=False)
    trainer = _trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=1)
    with pytest.raises(ReparamCheckError, match=r"max relative error .* > tolerance 0.0001"):
        trainer.fit(_task(), datamodule=_dm(demo))
    assert not list(tmp_path.rglob("deploy.*"))


def test_tolerance_and_check_size_are_validated():
    with pytest.raises(ValueError, match="reparam.tolerance"):
        ReparamCallback(tolerance=0)
    with pytest.raises(ValueError, match="reparam.check_samples"):
        ReparamCallback(check_samples=0)


def test_convert_to_deploy_twice_is_harmless():
    task = randomize_bn(_task()).eval()
    x = torch.randn(2, 3, 64, 64)
    first = task.convert_to_deploy(x)
    second = task.convert_to_deploy(x)
    assert first["relative_error"] < 1e-5 and second["relative_error"] == 0.0
    assert second["params_train"] == second["params_deploy"] == first["params_deploy"]


# --------------------------------------------------------------------------- optimisation
def test_no_weight_decay_on_bn_and_bias():
    task = _task(weight_decay=1e-4)
    decay, no_decay = task.parameter_groups()
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.parameters()))
    (single,) = _task(no_decay_bn_bias=False).parameter_groups()
    assert len(single["params"]) == len(list(task.parameters()))


def test_warmup_then_cosine():
    task = _task(min_lr=0.005, warmup_start_factor=0.1)  # lr 0.05
    f = lambda step: task.lr_factor(step, total_steps=110, warmup_steps=10)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    assert math.isclose(task.lr_factor(0, 100, 0), 1.0)


def test_label_out_of_range_is_reported():
    task = _task(num_classes=10)
    batch = (torch.randn(2, 3, 64, 64), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"label value 10 out of range \[0, 10\)"):
        task.validation_step(batch, 0)


def test_unknown_optimizer_and_backbone():
    with pytest.raises(ValueError, match="model.optimizer"):
        _task(optimizer="lamb")
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        _task("nope")
