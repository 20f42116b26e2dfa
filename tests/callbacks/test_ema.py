"""callbacks.ema.EMA (Lightning's EMAWeightAveraging with this project's fixes), with real Trainers
on a tiny MobileOne task and synthetic 32 px images: the average equals one computed by hand from
the weights recorded after each step; validation, the best checkpoint, ReparamCallback and the test
after fit use it; resuming without the callback continues the trained weights."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from backbones.memory_format import is_channels_last, to_channels_last
from callbacks.ema import EMA
from callbacks.reparam import ReparamCallback
from tasks.classification import ClassificationTask

ARCH = "mobileone_s0_tiny"  # BN everywhere, and a deploy conversion
CLASSES = 4
SIZE = 32


class _Data(pl.LightningDataModule):
    """Fixed random images, unshuffled: ``(N, 3, 32, 32)`` and labels ``(N,)``."""

    def __init__(self, train: int = 32, val: int = 16, batch_size: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.sets = {name: TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=gen), torch.arange(n) % CLASSES)
                     for name, n in (("train", train), ("val", val))}
        self.loader_batch = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["train"], batch_size=self.loader_batch)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=self.loader_batch)

    test_dataloader = val_dataloader


def _task(arch: str = ARCH) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(arch, num_classes=CLASSES, lr=0.1, weight_decay=0.0)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Probe(pl.Callback):
    """Listed after the EMA: records the trained weights after every optimizer step, and at each
    validation (after the EMA swapped its weights in) the model's and the copy's weights."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validations: list[tuple[int, dict, dict]] = []  # (global step, model's, EMA copy's)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.steps):  # an optimizer step ended with this batch
            self.steps.append(_snapshot(pl_module))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            copy = self.ema._average_model.module
            self.validations.append((trainer.global_step, _snapshot(pl_module), _snapshot(copy)))


def _hand_ema(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The first update copies, each later one is ``decay * ema + (1 - decay) * weights`` (float64).
    An integer buffer (num_batches_tracked) gets that value in float32 (torch's type for a Python
    float times an integer tensor), truncated."""
    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in steps[0].items()}
    for step in steps[1:]:
        for k, v in step.items():
            if v.is_floating_point():
                ema[k] = decay * ema[k] + (1 - decay) * v.double()
            else:
                ema[k] = (decay * ema[k] + (1 - decay) * v).long()
    return ema


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for k, e in expected.items():
        a = actual[k].double()
        error = float((a - e).abs().max() / e.abs().max().clamp_min(1e-12))
        assert error <= rel, f"{k}: relative error {error:.3g}"


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    kwargs = {"max_epochs": 1, "logger": False, "enable_checkpointing": False, "num_sanity_val_steps": 0, **kwargs}
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, default_root_dir=str(root),
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _evaluate(weights: dict[str, torch.Tensor], data: _Data) -> tuple[float, float]:
    """Val loss (mean cross-entropy) and top-1 of the train-time task holding ``weights``, by hand."""
    task = _task()
    task.load_state_dict(weights)
    images, labels = data.sets["val"].tensors
    with torch.no_grad():
        logits = task.eval()(images)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


# --------------------------------------------------------------------------- the average
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_average_equals_one_computed_by_hand_from_the_recorded_weights(tmp_path, accumulate):
    """4 optimizer steps at decay 0.75 (exact in binary, so the integer buffer's value is exact):
    parameters and BN running statistics are the hand-computed EMA, copied into the model when
    training ends. With 2 accumulated batches per step the EMA updates once per optimizer step."""
    decay = 0.75
    ema = EMA(decay=decay)
    probe = _Probe(ema)
    task = _task()
    trainer = _trainer(tmp_path, [ema, probe], limit_train_batches=4 * accumulate, limit_val_batches=0,
                       accumulate_grad_batches=accumulate)
    trainer.fit(task, datamodule=_Data(train=64))
    assert len(probe.steps) == trainer.global_step == 4
    expected = _hand_ema(probe.steps, decay)
    final = _snapshot(task)
    _assert_close(final, expected)
    assert any("running_mean" in k for k in final) and any("running_var" in k for k in final)
    assert _max_difference(final, probe.steps[-1]) > 1e-3  # the average is not the trained weights
    # num_batches_tracked: each BN has seen 4 * accumulate batches; the EMA's integer count lags
    counts = {k: int(v) for k, v in final.items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {{1: 1, 2: 4}[accumulate]}
    assert {int(probe.steps[-1][k]) for k in counts} == {4 * accumulate}


def test_before_the_first_update_the_average_is_the_model(tmp_path):
    """update_starting_at_step beyond a 3-step fit: validation and the end of fit use the trained
    weights, not the copy the callback took before training (Lightning's plain callback would)."""
    ema = EMA(decay=0.5, update_starting_at_step=100)
    probe = _Probe(ema)
    task = _task()
    initial = _snapshot(task)
    trainer = _trainer(tmp_path, [ema, probe], limit_train_batches=3, limit_val_batches=1)
    trainer.fit(task, datamodule=_Data())
    (_, validated, _), = probe.validations
    for weights in (validated, _snapshot(task)):
        assert all(torch.equal(weights[k], probe.steps[-1][k]) for k in weights)
    assert _max_difference(probe.steps[-1], initial) > 1e-3


# --------------------------------------------------------------------------- validation, best checkpoint, deploy
def _recording(events: list[str], cls: type, hook: str, name: str) -> type:
    """``cls`` with ``hook`` appending ``name`` to ``events`` before it runs."""
    def run(self, trainer, pl_module):
        events.append(name)
        getattr(cls, hook)(self, trainer, pl_module)
    return type(f"Recording{cls.__name__}", (cls,), {hook: run})


@pytest.fixture(scope="module", params=[True, False], ids=["load_best", "last_ema"])
def fitted(request, tmp_path_factory):
    """2 epochs of 4 steps at decay 0.8, validated each epoch, the best val/loss checkpoint kept,
    ReparamCallback(load_best) converting, then the test after fit."""
    root = tmp_path_factory.mktemp("fit")
    events: list[str] = []  # the order in which the EMA's on_train_end and ReparamCallback's on_fit_end ran
    ema = _recording(events, EMA, "on_train_end", "ema.on_train_end")(decay=0.8)
    reparam = _recording(events, ReparamCallback, "on_fit_end", "reparam.on_fit_end")(load_best=request.param)
    probe = _Probe(ema)
    ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), monitor="val/loss", mode="min", save_last=True)
    data = _Data()
    task = _task()
    trainer = _trainer(root, [ema, probe, ckpt, reparam], max_epochs=2, limit_train_batches=4, limit_val_batches=2,
                       enable_checkpointing=True, logger=pl.loggers.CSVLogger(str(root), name="run"))
    trainer.fit(task, datamodule=data)
    val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    (test_metrics,) = trainer.test(task, datamodule=data, verbose=False)
    return types.SimpleNamespace(load_best=request.param, events=events, ema=ema, reparam=reparam, probe=probe,
                                 ckpt=ckpt, data=data, task=task, val=val_metrics, test=test_metrics)


def test_validation_runs_on_the_average(fitted):
    probe = fitted.probe
    assert [step for step, _, _ in probe.validations] == [4, 8]
    for step, model, copy in probe.validations:
        _assert_close(model, _hand_ema(probe.steps[:step], 0.8))  # the EMA is swapped in...
        assert all(torch.equal(copy[k], probe.steps[step - 1][k]) for k in copy)  # ...the trained weights out
    # the last validation's metrics are the EMA model's, evaluated by hand, not the trained weights'
    loss, top1 = _evaluate(probe.validations[-1][1], fitted.data)
    assert fitted.val["val/loss"] == pytest.approx(loss, rel=1e-5) and fitted.val["val/top1"] == pytest.approx(top1)
    raw_loss, _ = _evaluate(probe.steps[-1], fitted.data)
    assert abs(raw_loss - loss) > 1e-3


def test_the_best_checkpoint_holds_the_average_and_the_trained_weights_beside_it(fitted):
    checkpoint = torch.load(fitted.ckpt.best_model_path, weights_only=True)
    step = checkpoint["global_step"]
    ((_, ema_weights, trained),) = [(s, m, c) for s, m, c in fitted.probe.validations if s == step]
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in ema_weights.items())
    assert all(torch.equal(checkpoint["current_model_state"][k], v) for k, v in trained.items())
    assert int(checkpoint["averaging_state"]["n_averaged"]) == step
    assert checkpoint["callbacks"]["EMAWeightAveraging"] == {"latest_update_step": step}  # Lightning's key


def test_reparam_converts_the_average_after_the_ema_copied_it(fitted):
    assert fitted.events == ["ema.on_train_end", "reparam.on_fit_end"]
    if fitted.load_best:
        expected = torch.load(fitted.ckpt.best_model_path, weights_only=True)["state_dict"]
        assert fitted.reparam.info["source_checkpoint"] == fitted.ckpt.best_model_path
    else:
        expected = _hand_ema(fitted.probe.steps, 0.8)
        assert fitted.reparam.info["source_checkpoint"] is None
    train_time = _task()
    train_time.load_state_dict({k: v.float() if v.is_floating_point() else v.long() for k, v in expected.items()})
    raw = _task()
    raw.load_state_dict(fitted.probe.steps[-1])
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        deployed, reference, trained = fitted.task.eval()(x), train_time.eval()(x), raw.eval()(x)
    assert fitted.task.deploy
    scale = reference.abs().max()
    assert (deployed - reference).abs().max() / scale <= 1e-4
    assert (trained - reference).abs().max() / scale > 1e-2
    # the test after fit tested that deploy model: the same numbers as the EMA train-time model by hand
    images, labels = fitted.data.sets["val"].tensors
    with torch.no_grad():
        logits = train_time(images)
    assert fitted.test["test/top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert fitted.test["test/loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-4)
    assert fitted.ema._average_model is None  # released when fit ended


# --------------------------------------------------------------------------- checkpoints without the callback
def test_an_ema_checkpoint_loads_its_average_and_resumes_its_trained_weights_without_the_callback(tmp_path, capsys):
    data = _Data()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(tmp_path, [EMA(decay=0.5), ckpt], limit_train_batches=3, limit_val_batches=0,
             enable_checkpointing=True).fit(_task(), datamodule=data)
    checkpoint = torch.load(ckpt.last_model_path, weights_only=True)
    assert _max_difference(checkpoint["state_dict"], checkpoint["current_model_state"]) > 1e-3

    # --model.weights / ReparamCallback(load_best): the average (state_dict)
    task = _task()
    task.load_weights(ckpt.last_model_path)
    assert all(torch.equal(v, checkpoint["state_dict"][k]) for k, v in task.state_dict().items())

    # fit --ckpt_path without the callback: the trained weights, which the optimizer state belongs to
    # (max_epochs already reached: nothing trains after the restore)
    task = _task()
    _trainer(tmp_path, [], limit_train_batches=3, limit_val_batches=0).fit(task, datamodule=data,
                                                                           ckpt_path=ckpt.last_model_path)
    assert all(torch.equal(v, checkpoint["current_model_state"][k]) for k, v in task.state_dict().items())
    assert "resuming the trained weights (current_model_state)" in capsys.readouterr().out


# --------------------------------------------------------------------------- device, layout, checks
def _set_up(ema: EMA, task: ClassificationTask) -> None:
    ema.setup(types.SimpleNamespace(checkpoint_callbacks=[]), task, "fit")


def test_the_copy_follows_the_models_device_and_layout_when_fit_starts():
    """Lightning copies the module in setup, before the strategy moves it and before the task's
    setup makes it channels_last; on_fit_start moves the copy after it ("meta" stands in for a GPU)."""
    task = _task("resnet_tiny")  # full 3x3 convs: channels_last differs from NCHW
    ema = EMA()
    _set_up(ema, task)
    copy = ema._average_model
    before = _snapshot(copy.module)
    to_channels_last(task)
    assert is_channels_last(task) and not is_channels_last(copy.module)
    ema.on_fit_start(None, task)
    assert is_channels_last(copy.module)
    assert [t.stride() for t in copy.module.parameters()] == [t.stride() for t in task.parameters()]
    assert all(torch.equal(v, before[k]) for k, v in copy.module.state_dict().items())  # values unchanged
    task.to("meta")
    ema.on_fit_start(None, task)
    assert {t.device.type for t in [*copy.parameters(), *copy.buffers()]} == {"meta"}

    kept = EMA(device="cpu")
    task = _task()
    _set_up(kept, task)
    task.to("meta")
    kept.on_fit_start(None, task)
    assert {t.device.type for t in [*kept._average_model.parameters(), *kept._average_model.buffers()]} == {"cpu"}


def test_a_model_changed_after_the_copy_is_refused():
    task = _task()
    ema = EMA()
    _set_up(ema, task)
    task.backbone.fc = torch.nn.Linear(task.backbone.fc.in_features, CLASSES + 1)
    with pytest.raises(RuntimeError, match=r"EMA: the model changed structure after the EMA copy was made .*'backbone\.fc"):
        ema.on_fit_start(None, task)


@pytest.mark.parametrize("kwargs,message", [
    ({"decay": 1.0}, r"EMA decay must be in \[0, 1\), got 1.0 \(callbacks.ema.EMA init_args.decay"),
    ({"decay": -0.1}, r"EMA decay must be in \[0, 1\), got -0.1"),
    ({"update_every_n_steps": 0}, "EMA update_every_n_steps must be at least 1, got 0"),
    ({"update_starting_at_step": -1}, "EMA update_starting_at_step must be None or at least 0, got -1"),
    ({"update_starting_at_epoch": -2}, "EMA update_starting_at_epoch must be None or at least 0, got -2"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(**kwargs)


def test_a_weights_only_model_checkpoint_is_refused(tmp_path):
    trainer = _trainer(tmp_path, [EMA(), ModelCheckpoint(dirpath=str(tmp_path), save_weights_only=True)],
                       enable_checkpointing=True, limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"EMA with ModelCheckpoint\(save_weights_only=True\).*remove save_weights_only"):
        trainer.fit(_task(), datamodule=_Data())
